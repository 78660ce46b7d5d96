"""A feature report (:mod:`dlmscope.interp.report`) exported for Neuronpedia, as SAEDashboard batch files.

**Batches**. :func:`export_neuronpedia` writes the ``batch-{i}.json`` files SAEDashboard's ``NeuronpediaRunner``
writes for upload (jbloomAus/SAEDashboard ``sae_dashboard/neuronpedia/neuronpedia_runner.py``; fields from
``neuronpedia_dashboard.py`` ``to_dict`` and ``neuronpedia_converter.py``; example
``tests/acceptance/test_simple/batch-0.json``). They are converted to Neuronpedia's import layout
``{model}/{layer}-{set}[__suffix]/{features,activations,explanations}/batch-N.jsonl.gz`` (docs.neuronpedia.org/
api-and-data/exports) by neuronpedia's ``utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-
export.py`` or SAEDashboard's ``neuronpedia/neuronpedia_export.py``; every key they read with ``[...]`` is written.
*Certain* (read there): key names and nesting; ``pos_*``/``neg_*`` = promoted/suppressed tokens (largest / most
negative first, SAEDashboard's order); ``frac_nonzero`` a fraction; ``freq_hist_data_bar_values`` bin centres,
``_bar_heights`` counts; an activation's ``tokens``/``values`` per window token, ``qualifying_token_index`` its
centre, ``bin_min=-1, bin_max=max act, bin_contains=-1`` for the top-activations group. *Neutral fill* (the report
has no such data): ``logits_hist_data_*``, ``neuron_alignment_*``, ``correlated_*``, ``decoder_weights_dist``,
``vector`` are ``[]``; ``n_prompts_total``, ``n_tokens_in_prompt``, ``dataset`` are arguments (``0, 0, ""``).
*Uncertain*: (1) how Neuronpedia's UI shows those empty lists; (2) importance-weighted windows are no quantile
interval: their group gets ``bin_min``/``bin_max`` = the range of its centre activations and ``bin_contains=-1``
(share unknown; SAEDashboard writes a fraction for interval groups); (3) the report's log-spaced histogram
(:data:`dlmscope.interp.features.HIST_EDGES`) becomes arithmetic bin midpoints (SAEDashboard's bins are linear),
empty bins outside the first..last non-empty one dropped; (4) tokens are written as the tokenizer spells them (SAEDashboard maps byte-BPE
marks, ``Ġ`` -> space: pass ``token_text``). *Not exported*: DLM ``masked`` statistics (no place in the layout).

**Explanations**: :func:`export_explanations` writes rows of neuronpedia-utils' ``db_models/explanation.py`` (``id,
modelId, layer`` = source id, ``index`` a string, ``description, authorId, embedding, triggeredById, typeName,
explanationModelName, notes, createdAt``), one JSON object a line, as ``batch-autointerp.py`` writes them. *Uncertain*:
ids are cuid-shaped hashes (Neuronpedia makes cuid2 ids); ``authorId`` must be a Neuronpedia user id to import
(default ``""``); detection accuracy goes to ``notes`` (Neuronpedia's score-table format is not in the sources read).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from dlmscope.util import atomic
from .report import validate_report

__all__ = ["export_neuronpedia", "export_explanations", "source_id"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _ident(value, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{what} must be letters, digits, '.', '_' or '-' (a Neuronpedia id), got {value!r}")
    return value


def source_id(layer: int, sae_id: str, sae_id_suffix: str | None = None) -> str:
    """Neuronpedia's source id: ``{layer}-{sae_id}`` (+ ``__{suffix}``), e.g. ``4-dlmscope-unmask-512``."""
    suffix = f"__{_ident(sae_id_suffix, 'sae_id_suffix')}" if sae_id_suffix else ""
    return f"{layer}-{_ident(sae_id, 'sae_id')}{suffix}"


def _entries(report, require_entry: Sequence[str] = ()) -> tuple[int, list[tuple[int, Mapping]]]:
    """``(layer, [(latent id, entry)] sorted by id)`` of a report that :func:`validate_report` passes with its
    ``layer`` and ``require_entry``, and that has a latent to export."""
    validate_report(report, require_header=("layer",), require_entry=require_entry)
    if not report["latents"]:
        raise ValueError("bad report: no latents to export")
    return report["layer"], sorted(((int(key), e) for key, e in report["latents"].items()), key=lambda kv: kv[0])


def _window(w: Mapping, text: Callable[[str], str]) -> dict:
    return {"tokens": [text(t) for t in w["tokens"]], "values": list(w["values"]),
            "qualifying_token_index": w["centre"]}


def _group(windows: list, text, top: bool, max_act) -> list[dict]:
    """One activation group: ``bin_min=-1, bin_max=max act`` for the top windows, the range of the centre
    activations for the others (see the module docstring)."""
    acts = [_window(w, text) for w in windows]
    centres = [a["values"][a["qualifying_token_index"]] for a in acts]
    lo, hi = (-1, max_act if max_act is not None else max(centres, default=0)) if top else \
        (min(centres, default=0), max(centres, default=0))
    return [{"bin_min": lo, "bin_max": hi, "bin_contains": -1, **a} for a in acts]


def _logits(pairs: list, text, sign: int) -> tuple[list[str], list[float]]:
    """Tokens and values, largest first (``sign`` +1) or most negative first (-1)."""
    rows = sorted(((text(t), v) for t, v in pairs), key=lambda r: -sign * r[1])
    return [r[0] for r in rows], [r[1] for r in rows]


def _histogram(h: Mapping | None) -> tuple[list[float], list]:
    """Bin midpoints and counts from the first to the last non-empty bin (integral counts as ints)."""
    if h is None:
        return [], []
    edges, counts = h["edges"], h["counts"]
    used = [i for i, c in enumerate(counts) if c > 0]
    if not used:
        return [], []
    span = range(used[0], used[-1] + 1)
    return [(edges[i] + edges[i + 1]) / 2 for i in span], [int(counts[i]) if float(counts[i]).is_integer()
                                                          else counts[i] for i in span]


def _feature(f: int, e: Mapping, text, include_importance: bool, common: dict) -> dict:
    logits = e.get("logits") or {}
    pos_str, pos_values = _logits(logits.get("promoted", []), text, +1)
    neg_str, neg_values = _logits(logits.get("suppressed", []), text, -1)
    bar_values, bar_heights = _histogram(e.get("histogram"))
    acts = _group(e.get("top", []), text, True, e.get("max_act"))
    if include_importance:
        acts += _group(e.get("importance", []), text, False, None)
    return {"feature_index": f, **{key: [] for key in (
                "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson")},
            "neg_str": neg_str, "neg_values": neg_values, "pos_str": pos_str, "pos_values": pos_values,
            "frac_nonzero": e["frequency"], "freq_hist_data_bar_values": bar_values,
            "freq_hist_data_bar_heights": bar_heights, "logits_hist_data_bar_heights": [],
            "logits_hist_data_bar_values": [], **common, "decoder_weights_dist": [], "activations": acts, "vector": []}


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=True, allow_nan=False)      # ASCII escapes, as SAEDashboard writes


def export_neuronpedia(report: Mapping, out_dir: str | os.PathLike, *, model_id: str, sae_id: str,
                       batch_size: int = 128, sae_id_suffix: str | None = None, dataset: str = "",
                       n_prompts_total: int = 0, n_tokens_in_prompt: int = 0, include_importance: bool = True,
                       token_text: Callable[[str], str] | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``report``'s latents (sorted by id) as SAEDashboard batch files ``out_dir/batch-{i}.json`` of
    ``batch_size`` features each, plus ``run_settings.json``; returns the batch files in order. ``sae_id`` is the
    Neuronpedia source set (``sae_set``; the layer is prefixed on import, :func:`source_id`). The whole report is
    checked before anything is written; existing ``batch-*.json`` files raise ``FileExistsError`` unless
    ``overwrite`` (then all of them are replaced, so no stale batch survives). See the module docstring for what
    each field holds and which are placeholders."""
    (layer, entries), model_id = _entries(report, ("frequency",)), _ident(model_id, "model_id")
    sid = source_id(layer, sae_id, sae_id_suffix)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for name, v in (("n_prompts_total", n_prompts_total), ("n_tokens_in_prompt", n_tokens_in_prompt)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    text = token_text or (lambda t: t)
    common = {"n_prompts_total": n_prompts_total, "n_tokens_in_prompt": n_tokens_in_prompt, "dataset": dataset}
    features = [_feature(f, e, text, include_importance, common) for f, e in entries]
    head = {"model_id": model_id, "layer": layer, "sae_set": sae_id, "sae_id_suffix": sae_id_suffix}
    texts = [_dumps({**head, "features": features[i:i + batch_size]}) for i in range(0, len(features), batch_size)]
    info = {key: report.get(key) for key in ("model", "policy", "is_diffusion", "tokens_seen", "n_latents", "k")}
    settings = json.dumps({**head, "source_id": sid, "n_features_at_a_time": batch_size, "n_features": len(features),
                           "n_prompts_total": n_prompts_total, "n_tokens_in_prompt": n_tokens_in_prompt,
                           "huggingface_dataset_path": dataset, "exporter": "dlmscope.interp.neuronpedia",
                           "dlmscope_report": info}, indent=2, allow_nan=False) + "\n"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("batch-*.json"))
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds {len(stale)} batch-*.json files; overwrite=True replaces them")
    for p in stale:
        p.unlink()
    paths = [out / f"batch-{i}.json" for i in range(len(texts))]
    for p, t in zip(paths, texts):
        atomic.write_text(p, t)
    atomic.write_text(out / "run_settings.json", settings)
    return paths


def export_explanations(report: Mapping, path: str | os.PathLike, *, model_id: str, sae_id: str,
                        sae_id_suffix: str | None = None, author_id: str = "", type_name: str = "dlmscope",
                        created_at: datetime | None = None) -> Path:
    """Write the report's explanations (``latents[*].interp.explanation``) as Neuronpedia explanation rows, one
    JSON object a line, to ``path`` (gzipped when it ends in ``.gz``; Neuronpedia's folder is
    ``{model}/{source}/explanations/batch-N.jsonl[.gz]``). Latents without an explanation are skipped; a report
    with none raises. ``explanationModelName`` is ``interp["explainer"]`` if given; the detection accuracy and
    judge go into ``notes``."""
    (layer, entries), model_id = _entries(report), _ident(model_id, "model_id")
    sid, stamp = source_id(layer, sae_id, sae_id_suffix), (created_at or datetime.now()).isoformat()
    rows = []
    for f, e in entries:
        interp = e.get("interp")
        if interp is None:
            continue
        desc = interp.get("explanation")
        if not isinstance(desc, str) or not desc.strip():
            raise ValueError(f"bad report: latent {f}: interp.explanation must be a non-empty string")
        notes = []
        if interp.get("accuracy") is not None:
            notes.append(f"detection accuracy {interp['accuracy']:.4g}")
        if interp.get("judge"):
            notes.append(f"judge: {interp['judge']}")
        key = hashlib.sha1(f"{model_id}/{sid}/{f}/{desc}".encode("utf-8", "surrogatepass")).hexdigest()
        rows.append({"id": "c" + key[:24], "modelId": model_id, "layer": sid, "index": str(f),
                     "description": desc.strip(), "authorId": author_id, "embedding": None, "triggeredById": None,
                     "typeName": type_name, "explanationModelName": interp.get("explainer"),
                     "notes": "; ".join(notes) or None, "createdAt": stamp})
    if not rows:
        raise ValueError("bad report: no latent has interp.explanation; nothing to export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(_dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        atomic.write_bytes(path, gzip.compress(body.encode("ascii"), mtime=0))
    else:
        atomic.write_text(path, body)
    return path
