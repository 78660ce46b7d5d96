"""The feature report: its schema and the one validator every reader of a report runs first.

A report is the JSON-able dict :func:`dlmscope.interp.features.feature_report` returns;
:func:`dlmscope.interp.autointerp.score_report` adds ``interp``, a job may add ``concept``. Its shape, with the
optional parts marked::

    {"model", "layer", "policy", "n_latents", "k", "tokens_seen", "is_diffusion",        # header (all optional)
     "latents": {str(id): {"latent", "frequency", "n_fired", "max_act",
                           "top": [window], "importance": [window],
                           "histogram": {"edges": [B + 1], "counts": [B]},
                           "logits": {"promoted": [[token, value]], "suppressed": [[token, value]]},
                           "masked": {"frequency", "n_fired", "max_act", "top": [window + "hidden"],
                                      "hidden_tokens": [[token, count]]},              # DLMs only
                           "interp": {"explanation", "accuracy", "judge"}, "concept": {"name", "f1"}}}}
    window = {"tokens": [T] str, "values": [T] float (this latent's activation per token), "centre": int}

A scored report also holds ``interp_summary`` (means over the scored latents with intervals; ``complete`` False
when the judge failed part-way), and the dashboard job adds ``judge_calls`` (calls, failures by reason) and, when
the judge stopped the scoring, ``interp_error``. Numbers that are not finite are written as ``null``.

:func:`validate_report` checks every part that is present: each field has its type (counts ints >= 0, names
strings, ``is_diffusion`` a bool), numbers are finite (``frequency`` a fraction), a window has as many values as
tokens and its centre among them, histogram edges increase and counts are
``>= 0``, a ``masked`` section only in a report for a diffusion LM. A reader names what it cannot do without
(``require_header`` / ``require_entry``): the dashboard each latent's ``top`` windows, the Neuronpedia export the
``layer`` and each latent's ``frequency``. A bad report raises ``ValueError("bad report: ...")`` naming the
latent and the field. :func:`read_report` reads a ``report.json`` and validates it, its errors naming the file.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence

from dlmscope.util import atomic

__all__ = ["LATENT_KEY", "REQUIRABLE_HEADER", "REQUIRABLE_ENTRY", "validate_report", "read_report"]

#: a latent key is ``str(id)`` exactly (it names files, so nothing else may pass)
LATENT_KEY = re.compile(r"0|[1-9][0-9]*")
#: the fields a reader may require, of the header and of every latent entry
REQUIRABLE_HEADER = ("layer",)
REQUIRABLE_ENTRY = ("frequency", "n_fired", "max_act", "top", "importance")


def _finite(x: numbers.Real) -> bool:
    """Whether the real number ``x`` is finite as a float (an int too large for a float is not)."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _number(x, where: str, *, required: bool = False, fraction: bool = False) -> None:
    """A finite real number (not a bool), in [0, 1] for a ``fraction``; None passes unless ``required``."""
    if x is None and not required:
        return
    if x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Real)):
        raise ValueError(f"bad report: {where} must be a number, got {_short(x)}")
    if x is None or not _finite(x):
        raise ValueError(f"bad report: {where} must be a finite number, got {_short(x)}")
    if fraction and not 0 <= x <= 1:
        raise ValueError(f"bad report: {where} must be a fraction in [0, 1], got {x!r}")


def _short(x) -> str:
    """``repr(x)``, cut to 60 characters (a wrong value may be a whole section)."""
    text = repr(x) if not isinstance(x, int) or abs(x) < 10 ** 30 else f"an integer of {len(str(abs(x)))} digits"
    return text if len(text) <= 60 else text[:57] + "..."


def _typed(x, types: tuple, what: str, where: str) -> None:
    """``x`` is None or an instance of ``types`` (not a bool unless ``bool`` is one of them), else ValueError."""
    if x is None or (isinstance(x, types) and (bool in types or not isinstance(x, bool))):
        return
    raise ValueError(f"bad report: {where} must be {what}, got {_short(x)}")


def _count(x, where: str) -> None:
    """An int >= 0 (not a bool); None passes."""
    _typed(x, (int,), "an int >= 0", where)
    if x is not None and x < 0:
        raise ValueError(f"bad report: {where} must be an int >= 0, got {_short(x)}")


def _windows(part: Mapping, name: str, where: str, *, prefix: str = "", required: bool = False) -> None:
    """``part[name]``, when present, is a list of windows (see the module docstring); ``prefix`` is the path of
    ``part`` within the entry (``"masked."``)."""
    if name not in part:
        if required:
            raise ValueError(f"bad report: {where}: entry has no {name!r} windows")
        return
    windows, path = part[name], prefix + name
    if not isinstance(windows, list):
        raise ValueError(f"bad report: {where}: {path} must be a list of windows, got {type(windows).__name__}")
    for i, w in enumerate(windows):
        at = f"{where}: {path}[{i}]"
        tokens, values = (w.get("tokens"), w.get("values")) if isinstance(w, Mapping) else (None, None)
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            got = (f"a {type(w).__name__} instead of a window" if not isinstance(w, Mapping) else
                   f"{type(tokens).__name__}" if not isinstance(tokens, list) else
                   f"the item {next(t for t in tokens if not isinstance(t, str))!r}")
            raise ValueError(f"bad report: {at}.tokens must be a list of strings (a window is a dict of "
                             f"'tokens', 'values' and 'centre'), got {got}")
        n = len(tokens)
        if not isinstance(values, list) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, list) else f"values of type {type(values).__name__}"
            raise ValueError(f"bad report: {at}: {n} tokens but {got} (values must be a list as long as its "
                             "tokens: one activation per token)")
        centre = w.get("centre")
        if isinstance(centre, bool) or not isinstance(centre, int) or not 0 <= centre < n:
            raise ValueError(f"bad report: {at}: centre {centre!r} is not a position of its {n} tokens (centre "
                             f"must be a token index in [0, {n}))")
        for j, v in enumerate(values):
            _number(v, f"{at}.values[{j}]", required=True)
        _typed(w.get("hidden"), (str,), "a string (the token a [MASK] hid)", f"{at}.hidden")


def _pairs(part: Mapping, name: str, where: str) -> None:
    """``part[name]``, when present, is a list of ``[token, number]`` pairs (logit effects, hidden-token counts)."""
    if name not in part:
        return
    pairs = part[name]
    if not isinstance(pairs, list):
        raise ValueError(f"bad report: {where}.{name} must be a list of [token, value] pairs, "
                         f"got {type(pairs).__name__}")
    for i, p in enumerate(pairs):
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)):
            raise ValueError(f"bad report: {where}.{name}[{i}] must be a [token, value] pair, got {p!r}")
        _number(p[1], f"{where}.{name}[{i}][1]", required=True)


def _histogram(h, where: str) -> None:
    if h is None:
        return
    edges, counts = (h.get("edges"), h.get("counts")) if isinstance(h, Mapping) else (None, None)
    if not isinstance(edges, list) or not isinstance(counts, list) or len(edges) != len(counts) + 1:
        raise ValueError(f"bad report: {where}: histogram needs 'edges' [B+1] and 'counts' [B] lists")
    for name, xs in (("edges", edges), ("counts", counts)):
        for i, x in enumerate(xs):
            _number(x, f"{where}: histogram.{name}[{i}]", required=True)
    if any(b <= a for a, b in zip(edges, edges[1:])) or any(c < 0 for c in counts):
        raise ValueError(f"bad report: {where}: histogram edges must increase and counts be >= 0")


def _section(entry: Mapping, name: str, where: str) -> Mapping:
    """``entry[name]`` as a dict (empty when missing or None)."""
    part = entry.get(name)
    if part is None:
        return {}
    if not isinstance(part, Mapping):
        raise ValueError(f"bad report: {where}: {name} must be a dict, got {type(part).__name__}")
    return part


def _latent(key: str, entry, diffusion: bool, required: Sequence[str]) -> None:
    where = f"latent {key}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"bad report: {where}: entry must be a dict, got {type(entry).__name__}")
    if entry.get("latent", int(key)) != int(key):
        raise ValueError(f"bad report: {where}: entry says latent {entry['latent']!r}; its key must be "
                         "str(latent id)")
    for name in ("frequency", "n_fired", "max_act"):
        _number(entry.get(name), f"{where}: {name}", required=name in required, fraction=name == "frequency")
    for name in ("top", "importance"):
        _windows(entry, name, where, required=name in required)
    _histogram(entry.get("histogram"), where)
    logits = _section(entry, "logits", where)
    for side in ("promoted", "suppressed"):
        _pairs(logits, side, f"{where}: logits")
    if entry.get("masked") is not None:
        if not diffusion:
            raise ValueError(f"bad report: {where}: has a 'masked' section, but the report is not for a diffusion "
                             "LM (is_diffusion is not true)")
        masked = _section(entry, "masked", where)
        _number(masked.get("frequency"), f"{where}: masked.frequency", fraction=True)
        for name in ("n_fired", "max_act"):
            _number(masked.get(name), f"{where}: masked.{name}")
        _windows(masked, "top", where, prefix="masked.")
        _pairs(masked, "hidden_tokens", f"{where}: masked")
    interp = _section(entry, "interp", where)
    for name in ("explanation", "judge", "explainer"):
        _typed(interp.get(name), (str,), "a string", f"{where}: interp.{name}")
    _number(interp.get("accuracy"), f"{where}: interp.accuracy")
    concept = _section(entry, "concept", where)
    _typed(concept.get("name"), (str,), "a string", f"{where}: concept.name")
    _typed(concept.get("f1"), (numbers.Real,), "a number", f"{where}: concept.f1")


def validate_report(report, *, require_header: Sequence[str] = (), require_entry: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming the first problem of a feature report (see the module docstring); the fields
    in ``require_header`` (of :data:`REQUIRABLE_HEADER`) and ``require_entry`` (of :data:`REQUIRABLE_ENTRY`,
    for every latent) must be present. An empty ``latents`` passes: whether that is useful is the reader's call."""
    unknown = {*require_header} - {*REQUIRABLE_HEADER} | {*require_entry} - {*REQUIRABLE_ENTRY}
    if unknown:
        raise TypeError(f"validate_report cannot require {sorted(unknown)}; it can require the header's "
                        f"{list(REQUIRABLE_HEADER)} and the entries' {list(REQUIRABLE_ENTRY)}")
    if not isinstance(report, Mapping):
        raise ValueError(f"bad report: a feature report is a dict, got {type(report).__name__}")
    if "latents" not in report:
        raise ValueError(f"bad report: the feature report has no 'latents' (keys: {sorted(report)}); it needs a "
                         "'latents' mapping of str(latent id) -> entry")
    latents = report["latents"]
    if not isinstance(latents, Mapping):
        raise ValueError(f"bad report: 'latents' must be a mapping of str(latent id) -> entry, "
                         f"got {type(latents).__name__}")
    layer = report.get("layer")
    if layer is not None or "layer" in require_header:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"bad report: 'layer' must be an int >= 0, got {_short(layer)}")
    for name in ("n_latents", "k", "tokens_seen", "alive"):
        _count(report.get(name), repr(name))
    for name in ("model", "policy"):
        _typed(report.get(name), (str,), "a string", repr(name))
    _typed(report.get("is_diffusion"), (bool,), "true or false", "'is_diffusion'")
    for key, entry in latents.items():
        if not isinstance(key, str) or not LATENT_KEY.fullmatch(key):
            raise ValueError(f"bad report: each key of 'latents' is a latent id string: it must be str(latent id), "
                             f"got {key!r}")
        _latent(key, entry, bool(report.get("is_diffusion")), require_entry)


def read_report(path: str | os.PathLike, *, require_header: Sequence[str] = (),
                require_entry: Sequence[str] = ()) -> dict:
    """The feature report in the JSON file ``path`` (a job's ``report.json``), validated (:func:`validate_report`
    with the fields required); ``ValueError`` naming the file for bad UTF-8 or JSON, nesting too deep to parse,
    or a bad report, ``FileNotFoundError`` for a missing file."""
    report = atomic.read_json(path, "not a readable feature report")
    try:
        validate_report(report, require_header=require_header, require_entry=require_entry)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None
    return report
