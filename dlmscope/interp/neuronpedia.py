"""Interoperability: a :class:`~dlmscope.sae.topk.TopKSAE` for SAEBench, a feature report for Neuronpedia.

**SAEBench** (github.com/adamkarvonen/SAEBench; SAEBench is not imported). Per SAEBench's
``sae_bench/custom_saes/base_sae.py`` and ``custom_sae_config.py`` (read in the zachmccrth/ and d0rbu/SAEBench copies),
upstream ``custom_saes/topk_sae.py`` and ``custom_saes/README.md``, a custom SAE is an ``nn.Module`` with
``encode(x) -> [..., d_sae]`` dense latents, ``decode(f)``, ``forward``, ``W_enc [d_in, d_sae]``, ``W_dec [d_sae,
d_in]`` (unit-norm rows), ``b_enc``, ``b_dec``, ``device``, ``dtype`` and a ``cfg`` with CustomSAEConfig's fields
(:class:`SAEBenchConfig`; ``cfg.dtype`` a string like ``"float32"``; default hook ``blocks.{L}.hook_resid_post``).
SAEBench reads a field from the cfg, else from ``cfg.metadata`` (SAELens 6), so both carry it: :class:`SAEBenchSAE`.

**Neuronpedia**. :func:`export_neuronpedia` writes the ``batch-{i}.json`` files SAEDashboard's ``NeuronpediaRunner``
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
(``interp.HIST_EDGES``) becomes arithmetic bin midpoints (SAEDashboard's bins are linear), empty bins outside the
first..last non-empty one dropped; (4) tokens are written as the tokenizer spells them (SAEDashboard maps byte-BPE
marks, ``Ġ`` -> space: pass ``token_text``). *Not exported*: DLM ``masked`` statistics (no place in the layout).

**Explanations**: :func:`export_explanations` writes rows of neuronpedia-utils' ``db_models/explanation.py`` (``id,
modelId, layer`` = source id, ``index`` a string, ``description, authorId, embedding, triggeredById, typeName,
explanationModelName, notes, createdAt``), one JSON object a line, as ``batch-autointerp.py`` writes them. *Uncertain*:
ids are cuid-shaped hashes (Neuronpedia makes cuid2 ids); ``authorId`` must be a Neuronpedia user id to import
(default ``""``); detection accuracy goes to ``notes`` (Neuronpedia's score-table format is not in the sources read).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

from torch import Tensor, nn

from dlmscope.util import atomic

__all__ = ["SAEBenchConfig", "SAEBenchSAE", "export_neuronpedia", "export_explanations", "source_id"]


# ---- SAEBench ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SAEBenchConfig:
    """SAEBench's CustomSAEConfig fields, with the values that describe a dlmscope Top-K SAE, plus ``k``."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = "topk"
    k: int | None = None
    apply_b_dec_to_input: bool = True           # our encoder subtracts b_dec
    finetuning_scaling_factor: bool = False
    activation_fn_str: str = "topk"
    activation_fn_kwargs: dict = dataclasses.field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"         # the norm factor is folded into the saved weights
    dtype: str = ""
    device: str = ""
    model_from_pretrained_kwargs: dict = dataclasses.field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: str | None = None
    neuronpedia_id: str | None = None

    @property
    def metadata(self) -> SimpleNamespace:
        """The SAELens-6 ``cfg.metadata`` view of the model fields (a fresh copy at every read)."""
        keys = ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size", "prepend_bos",
                "seqpos_slice", "dataset_path", "model_from_pretrained_kwargs", "neuronpedia_id")
        return SimpleNamespace(**{key: getattr(self, key) for key in keys})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: fields that describe the wrapped SAE's maths: set by the wrapper, never by the caller
_FIXED = {"d_in", "d_sae", "k", "dtype", "device", "architecture", "apply_b_dec_to_input", "activation_fn_str",
          "activation_fn_kwargs", "normalize_activations", "finetuning_scaling_factor", "model_name", "hook_layer",
          "hook_name"}
_SAE_ATTRS = ("encode", "encode_dense", "decode", "W_enc", "b_enc", "W_dec", "b_dec", "cfg")


class SAEBenchSAE(nn.Module):
    """A TopKSAE as SAEBench's custom SAE. Weights are shared, not copied: ``W_enc`` is a transposed view of the
    TopKSAE's ``W_enc [n, d]``, the others are its parameters; moving or casting the wrapper moves the TopKSAE.
    ``device``, ``dtype`` and ``cfg.dtype`` / ``cfg.device`` always describe the shared weights. ``cfg_fields``
    sets further CustomSAEConfig fields (``training_tokens``, ``neuronpedia_id``, ``seqpos_slice``, ...)."""

    def __init__(self, sae: nn.Module, *, model_name: str, hook_layer: int, hook_name: str | None = None,
                 context_size: int | None = 128, prepend_bos: bool = True, dataset_path: str = "", **cfg_fields):
        super().__init__()
        missing = [a for a in _SAE_ATTRS if not hasattr(sae, a)]
        if not isinstance(sae, nn.Module) or missing:
            raise TypeError(f"SAEBenchSAE wraps a dlmscope TopKSAE, got {type(sae).__name__}"
                            + (f" (it lacks {missing})" if missing else " (not an nn.Module)"))
        d, n, k = (getattr(sae.cfg, a, None) for a in ("d", "n", "k"))
        if not all(isinstance(v, int) for v in (d, n, k)):
            raise TypeError(f"SAEBenchSAE: the SAE's cfg must give ints d, n, k; got d={d!r} n={n!r} k={k!r}")
        for name, shape in (("W_enc", (n, d)), ("b_enc", (n,)), ("W_dec", (n, d)), ("b_dec", (d,))):
            if tuple(getattr(sae, name).shape) != shape:
                raise ValueError(f"SAEBenchSAE: {name} has shape {list(getattr(sae, name).shape)}, expected "
                                 f"{list(shape)} (the TopKSAE layout W_enc/W_dec [n, d])")
        if isinstance(hook_layer, bool) or not isinstance(hook_layer, int) or hook_layer < 0:
            raise ValueError(f"hook_layer must be an int >= 0 (the block whose output the SAE reads), "
                             f"got {hook_layer!r}")
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
        fields = {f.name for f in dataclasses.fields(SAEBenchConfig)}
        bad = sorted(set(cfg_fields) - (fields - _FIXED))
        if bad:
            why = "they follow from the wrapped SAE" if set(bad) <= _FIXED else f"settable: {sorted(fields - _FIXED)}"
            raise ValueError(f"cannot set cfg fields {bad}: {why}")
        self.sae = sae
        self._cfg = SAEBenchConfig(model_name=model_name, d_in=d, d_sae=n, hook_layer=hook_layer,
                                   hook_name=hook_name or f"blocks.{hook_layer}.hook_resid_post",
                                   context_size=context_size, k=k, activation_fn_kwargs={"k": k},
                                   prepend_bos=prepend_bos, dataset_path=dataset_path, **cfg_fields)

    # the shared weights in SAEBench's layout: W_enc a transposed view of the TopKSAE's [n, d], the rest as they are
    W_enc = property(lambda self: self.sae.W_enc.t(), doc="[d_in, d_sae] view of the TopKSAE's W_enc [n, d]")
    W_dec = property(lambda self: self.sae.W_dec, doc="[d_sae, d_in], unit-norm rows")
    b_enc = property(lambda self: self.sae.b_enc, doc="[d_sae]")
    b_dec = property(lambda self: self.sae.b_dec, doc="[d_in]")
    k = property(lambda self: self.sae.cfg.k, doc="active latents per input")
    # setting device / dtype moves the weights (BaseSAE.to updates these attributes, so SAEBench may set them)
    device = property(lambda self: self.sae.W_dec.device, lambda self, v: self.to(device=v))
    dtype = property(lambda self: self.sae.W_dec.dtype, lambda self, v: self.to(dtype=v))

    @property
    def cfg(self) -> SAEBenchConfig:
        self._cfg.dtype, self._cfg.device = str(self.dtype).removeprefix("torch."), str(self.device)
        return self._cfg

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents ``[..., d_sae]``: the TopKSAE's own encoder (b_dec subtracted), zeros off the top k."""
        return self.sae.encode_dense(x)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """``f @ W_dec + b_dec`` for any dense latents ``[..., d_sae]`` (not only top-k ones: ablations work)."""
        n = self.sae.cfg.n
        if not isinstance(feature_acts, Tensor) or feature_acts.dim() < 1 or feature_acts.shape[-1] != n:
            raise ValueError(f"decode takes dense latents [..., d_sae={n}], got "
                             f"{list(feature_acts.shape) if isinstance(feature_acts, Tensor) else type(feature_acts)}")
        W_dec, b_dec = (p if p.dtype == feature_acts.dtype else p.to(feature_acts.dtype)
                        for p in (self.sae.W_dec, self.sae.b_dec))
        return feature_acts @ W_dec + b_dec

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``: the same numbers as SAEBench's own encode-then-decode check."""
        return self.decode(self.encode(x))


# ---- Neuronpedia / SAEDashboard ----------------------------------------------------------------------------------
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _ident(value, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{what} must be letters, digits, '.', '_' or '-' (a Neuronpedia id), got {value!r}")
    return value


def source_id(layer: int, sae_id: str, sae_id_suffix: str | None = None) -> str:
    """Neuronpedia's source id: ``{layer}-{sae_id}`` (+ ``__{suffix}``), e.g. ``4-dlmscope-unmask-512``."""
    suffix = f"__{_ident(sae_id_suffix, 'sae_id_suffix')}" if sae_id_suffix else ""
    return f"{layer}-{_ident(sae_id, 'sae_id')}{suffix}"


def _num(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"bad report: {where} must be a finite number, got {x!r}")
    return x


def _entries(report) -> tuple[int, list[tuple[int, Mapping]]]:
    """(layer, [(latent id, entry)] sorted by id) of a checked feature report."""
    if not isinstance(report, Mapping) or not isinstance(report.get("latents"), Mapping):
        raise ValueError("bad report: expected a feature report dict with a 'latents' mapping (dlmscope.interp.features)")
    layer = report.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"bad report: 'layer' must be an int >= 0, got {layer!r}")
    out = []
    for key, entry in report["latents"].items():
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(entry, Mapping):
            raise ValueError(f"bad report: latents[{key!r}] must map a latent id string to a dict")
        if entry.get("latent", int(key)) != int(key):
            raise ValueError(f"bad report: latents[{key!r}] says latent {entry.get('latent')!r}")
        out.append((int(key), entry))
    if not out:
        raise ValueError("bad report: no latents to export")
    return layer, sorted(out, key=lambda kv: kv[0])


def _window(w, where: str, text: Callable[[str], str]) -> dict:
    toks, vals, centre = (w.get(k) for k in ("tokens", "values", "centre")) if isinstance(w, Mapping) else [None] * 3
    if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
        raise ValueError(f"bad report: {where}.tokens must be a list of strings")
    if not isinstance(vals, list) or len(vals) != len(toks):
        raise ValueError(f"bad report: {where}.values must be a list as long as its tokens ({len(toks)})")
    if isinstance(centre, bool) or not isinstance(centre, int) or not 0 <= centre < len(toks):
        raise ValueError(f"bad report: {where}.centre must be a token index in [0, {len(toks)}), got {centre!r}")
    return {"tokens": [text(t) for t in toks], "values": [_num(v, f"{where}.values[{i}]") for i, v in enumerate(vals)],
            "qualifying_token_index": centre}


def _group(windows, where: str, text, top: bool, max_act) -> list[dict]:
    if not isinstance(windows, list):
        raise ValueError(f"bad report: {where} must be a list of windows")
    acts = [_window(w, f"{where}[{i}]", text) for i, w in enumerate(windows)]
    centres = [a["values"][a["qualifying_token_index"]] for a in acts]
    lo, hi = (-1, max_act if max_act is not None else max(centres, default=0)) if top else \
        (min(centres, default=0), max(centres, default=0))
    return [{"bin_min": lo, "bin_max": hi, "bin_contains": -1, **a} for a in acts]


def _logits(pairs, where: str, text, sign: int) -> tuple[list[str], list[float]]:
    if not isinstance(pairs, list):
        raise ValueError(f"bad report: {where} must be a list of [token, value] pairs")
    rows = []
    for i, p in enumerate(pairs):
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)):
            raise ValueError(f"bad report: {where}[{i}] must be a [token, value] pair, got {p!r}")
        rows.append((text(p[0]), _num(p[1], f"{where}[{i}][1]")))
    rows.sort(key=lambda r: -sign * r[1])
    return [r[0] for r in rows], [r[1] for r in rows]


def _histogram(h, where: str) -> tuple[list[float], list]:
    if h is None:
        return [], []
    edges, counts = (h.get("edges"), h.get("counts")) if isinstance(h, Mapping) else (None, None)
    if not isinstance(edges, list) or not isinstance(counts, list) or len(edges) != len(counts) + 1:
        raise ValueError(f"bad report: {where} needs 'edges' [B+1] and 'counts' [B] lists")
    edges = [_num(e, f"{where}.edges[{i}]") for i, e in enumerate(edges)]
    counts = [_num(c, f"{where}.counts[{i}]") for i, c in enumerate(counts)]
    if any(b <= a for a, b in zip(edges, edges[1:])) or any(c < 0 for c in counts):
        raise ValueError(f"bad report: {where} edges must increase and counts be >= 0")
    used = [i for i, c in enumerate(counts) if c > 0]
    if not used:
        return [], []
    span = range(used[0], used[-1] + 1)
    return [(edges[i] + edges[i + 1]) / 2 for i in span], [int(counts[i]) if float(counts[i]).is_integer()
                                                          else counts[i] for i in span]


def _feature(f: int, e: Mapping, text, include_importance: bool, common: dict) -> dict:
    where = f"latents[{str(f)!r}]"
    freq = _num(e.get("frequency"), f"{where}.frequency")
    if not 0 <= freq <= 1:
        raise ValueError(f"bad report: {where}.frequency must be a fraction in [0, 1], got {freq!r}")
    max_act = _num(e["max_act"], f"{where}.max_act") if e.get("max_act") is not None else None
    logits = e.get("logits") or {}
    if not isinstance(logits, Mapping):
        raise ValueError(f"bad report: {where}.logits must be a dict with 'promoted' / 'suppressed'")
    pos_str, pos_values = _logits(logits.get("promoted", []), f"{where}.logits.promoted", text, +1)
    neg_str, neg_values = _logits(logits.get("suppressed", []), f"{where}.logits.suppressed", text, -1)
    bar_values, bar_heights = _histogram(e.get("histogram"), f"{where}.histogram")
    acts = _group(e.get("top", []), f"{where}.top", text, True, max_act)
    if include_importance:
        acts += _group(e.get("importance", []), f"{where}.importance", text, False, None)
    return {"feature_index": f, **{key: [] for key in (
                "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson")},
            "neg_str": neg_str, "neg_values": neg_values, "pos_str": pos_str, "pos_values": pos_values,
            "frac_nonzero": freq, "freq_hist_data_bar_values": bar_values, "freq_hist_data_bar_heights": bar_heights,
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], **common,
            "decoder_weights_dist": [], "activations": acts, "vector": []}


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
    (layer, entries), model_id = _entries(report), _ident(model_id, "model_id")
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
        desc = interp.get("explanation") if isinstance(interp, Mapping) else None
        if not isinstance(desc, str) or not desc.strip():
            raise ValueError(f"bad report: latents['{f}'].interp.explanation must be a non-empty string")
        notes = []
        if interp.get("accuracy") is not None:
            notes.append(f"detection accuracy {_num(interp['accuracy'], f'latents[{f}].interp.accuracy'):.4g}")
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
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(gzip.compress(body.encode("ascii"), mtime=0))
        os.replace(tmp, path)
    else:
        atomic.write_text(path, body)
    return path
