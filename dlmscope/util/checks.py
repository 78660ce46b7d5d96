"""Argument checks shared by the packages: one clear ValueError naming the argument, before any work."""
from __future__ import annotations

__all__ = ["require_int"]


def require_int(name: str, value, lo: int = 0) -> int:
    """``value`` when it is an int (not a bool) >= ``lo``; else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value
