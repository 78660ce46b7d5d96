"""How the demo's report writes numbers: signed values, seed spreads, intervals and verdict words."""
from __future__ import annotations

import math

__all__ = ["VERDICT", "fmt", "signed", "spread_text", "signed_spread", "ci", "over", "conjecture_words"]

#: how the report words a finding's verdict
VERDICT = {True: "**reproduced**", False: "**not reproduced**", "partly": "**partly reproduced**",
            "consistent": "**consistent with the claim**", "partly consistent": "**partly consistent with the claim**"}


def fmt(v, digits=3) -> str:
    """``v`` to ``digits`` decimals; NaN, or None (a NaN read back from results.json), as ``n/a``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def signed(v, digits=2) -> str:
    """``v`` with its sign; NaN or None as ``n/a``."""
    return "n/a" if v is None or v != v else f"{v:+.{digits}f}"


def spread_text(c: dict | None, digits: int = 2) -> str:
    """A seed spread ``mean [min, max] (n)``."""
    if not c or not c.get("n"):
        return "n/a"
    return f"{fmt(c['mean'], digits)} [{fmt(c['low'], digits)}, {fmt(c['high'], digits)}] ({c['n']})"


def signed_spread(c: dict | None) -> str:
    if not c or not c.get("n"):
        return "n/a"
    return f"{signed(c['mean'])} [{signed(c['low'])}, {signed(c['high'])}]"


def ci(c: dict) -> str:
    return f"{signed(c['mean'])} [{signed(c['low'])}, {signed(c['high'])}]"


def over(c: dict) -> str:
    """What an interval was resampled over, from its ``over`` field: ``concepts × prompts (10 × 24)``."""
    over = c.get("over") or {}
    return (" × ".join(over) + " (" + " × ".join(str(v) for v in over.values()) + ")") if over else "n/a"


def conjecture_words(conj: dict) -> str:
    """The conjecture's verdict in one clause: how many orders have a robust r, of which sign."""
    robust = len(conj.get("positive", [])) + len(conj.get("negative", []))
    return (f"{conj.get('verdict')} — a robust correlation (interval excluding 0) at {robust} of "
            f"{len(conj.get('orders', []))} orders (positive: {', '.join(conj.get('positive', [])) or 'none'}; "
            f"negative: {', '.join(conj.get('negative', [])) or 'none'})")
