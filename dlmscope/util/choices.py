"""One check for string options: an unknown value raises a ValueError naming the valid ones and the nearest."""
from __future__ import annotations

import difflib
from typing import Sequence

__all__ = ["check_choice"]


def check_choice(name: str, value, choices: Sequence[str], *, valid: str = "values") -> str:
    """``value`` if it is one of ``choices``; else ``ValueError("unknown NAME 'x' (did you mean 'y'?); valid
    VALID: a, b, c")`` — the nearest choice compared case-insensitively, ``valid`` naming the list."""
    if value not in choices:
        near = difflib.get_close_matches(str(value).lower(), [c.lower() for c in choices], n=1)
        hint = f" (did you mean {choices[[c.lower() for c in choices].index(near[0])]!r}?)" if near else ""
        raise ValueError(f"unknown {name} {value!r}{hint}; valid {valid}: {', '.join(map(str, choices))}")
    return value
