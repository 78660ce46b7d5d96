"""What differs between two JSON identities (a run's, a harvest's): the one comparison behind every refusal that
names the fields in which a checkpoint or a cache was produced otherwise."""
from __future__ import annotations

__all__ = ["differences"]

#: the value shown for a field one side does not hold
MISSING = "(not set)"


def _flatten(obj, prefix: str, out: dict) -> dict:
    """Leaves of a JSON value keyed by their path (``a.b``, ``a[0].c``); a list of scalars is one leaf."""
    if isinstance(obj, dict) and obj:
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}[{i}]", out)
    else:
        out[prefix] = obj
    return out


def differences(ours, theirs, *, only_shared: bool = False) -> list[tuple[str, object, object]]:
    """``(path, our value, their value)`` for every leaf where two JSON values differ, sorted by path (a leaf one
    side lacks shows as :data:`MISSING`); ``only_shared``: compare only the paths both hold."""
    a, b = _flatten(ours, "", {}), _flatten(theirs, "", {})
    keys = sorted(a.keys() & b.keys()) if only_shared else sorted(a.keys() | b.keys())
    return [(k, a.get(k, MISSING), b.get(k, MISSING)) for k in keys if a.get(k, MISSING) != b.get(k, MISSING)]
