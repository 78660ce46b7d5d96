"""One check for string options: an unknown value raises a ValueError naming the valid ones and the nearest."""
from __future__ import annotations

import difflib
from typing import Sequence

__all__ = ["check_choice"]


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else ``ValueError("unknown NAME 'x': expected one of …; did you
    mean 'y'?")``."""
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(map(repr, choices))}{hint}")
    return value
