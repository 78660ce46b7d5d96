"""Feature statistics for interpretation, in one streaming pass with bounded memory (docs/reference.md §4).

Per latent of a Top-K SAE at one layer, over a stream of token batches: firing count and frequency, a
histogram of its non-zero activations, the top-N activating windows (±``window`` tokens around the position,
with the latent's activation at every token of the window), importance-weighted sample windows (weighted
reservoir sampling: key ``u^(1/a)``), and its logit effect (the decoder row through the unembedding). A global
reservoir keeps random windows (the negatives of detection). For a DLM the same pass runs on corrupted text at
the masked positions only, and each masked window also keeps the hidden token (what the latent "predicts").

Memory: every store is ``[n_latents, N, 2·window + 1]`` (int32 tokens, float16 values) plus ``[n_latents, N]``
keys, whatever the stream's length; a batch adds at most ``B·T·k`` candidates, most of which are discarded
against the store's current minimum before any window is built. Activations at pad, BOS and EOS positions are
zeroed (as in SAEBench). The activation cache (:mod:`dlmscope.data.cache`) stores no token ids, so the
windows need the model pass; :func:`activation_stats` computes the context-free part (frequency, histogram)
from any ``[B, d]`` stream, a cached one included.

:func:`feature_report` runs the pass and returns the JSON-able report that :mod:`dlmscope.interp.autointerp` scores,
:mod:`dlmscope.interp.dashboard` renders and :mod:`dlmscope.interp.neuronpedia` exports.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dlmscope.data.activations import split_batch
from dlmscope.data.noise import corrupt

__all__ = ["HIST_EDGES", "WindowStore", "FeatureStats", "collect", "activation_stats", "logit_effects",
           "feature_report"]

#: histogram bin edges of non-zero activations (log-spaced, shared by every latent and SAE)
HIST_EDGES = torch.logspace(-3, 3, 37)


class WindowStore:
    """Per latent the ``size`` entries with the largest keys seen so far, each with its window.

    ``keys [n, size]`` (−inf = empty), ``tokens [n, size, W]`` int32 (−1 outside the text), ``values
    [n, size, W]`` float16, ``hidden [n, size]`` int32 (the masked token at the centre; −1 if none).
    """

    def __init__(self, n: int, size: int, width: int):
        self.n, self.size, self.width = n, size, width
        self.keys = torch.full((n, size), -math.inf)
        self.tokens = torch.full((n, size, width), -1, dtype=torch.int32)
        self.values = torch.zeros((n, size, width), dtype=torch.float16)
        self.hidden = torch.full((n, size), -1, dtype=torch.int32)

    def offer(self, latent: Tensor, key: Tensor, windows) -> None:
        """Merge candidates (``latent [C]``, ``key [C]``); ``windows(idx) -> (tokens [c, W], values [c, W],
        hidden [c])`` builds the windows of the candidates ``idx`` that are kept."""
        if self.size == 0:
            return
        floor = self.keys[:, -1]                                               # the store is sorted per latent
        pre = key > floor[latent]
        latent, key, cand = latent[pre], key[pre], pre.nonzero()[:, 0]
        if latent.numel() == 0:
            return
        n, S = self.n, self.size
        all_latent = torch.cat([torch.arange(n).repeat_interleave(S), latent])
        all_key = torch.cat([self.keys.reshape(-1), key])
        source = torch.cat([torch.arange(n * S), n * S + torch.arange(latent.numel())])   # old slot or candidate
        order = torch.sort(all_key, descending=True, stable=True).indices
        order = order[torch.sort(all_latent[order], stable=True).indices]          # by latent, then key desc
        lat_sorted = all_latent[order]
        start = torch.searchsorted(lat_sorted, torch.arange(n))
        rank = torch.arange(lat_sorted.numel()) - start[lat_sorted]
        keep = rank < S
        lat_k, rank_k, src_k = lat_sorted[keep], rank[keep], source[order][keep]
        new_keys = torch.full_like(self.keys, -math.inf)
        new_keys[lat_k, rank_k] = all_key[order][keep]
        new_tokens, new_values, new_hidden = self.tokens.clone(), self.values.clone(), self.hidden.clone()
        old = src_k < n * S
        o_lat, o_slot = src_k[old] // S, src_k[old] % S
        new_tokens[lat_k[old], rank_k[old]] = self.tokens[o_lat, o_slot]
        new_values[lat_k[old], rank_k[old]] = self.values[o_lat, o_slot]
        new_hidden[lat_k[old], rank_k[old]] = self.hidden[o_lat, o_slot]
        fresh = ~old
        if fresh.any():
            toks, vals, hid = windows(cand[src_k[fresh] - n * S])
            new_tokens[lat_k[fresh], rank_k[fresh]] = toks.to(torch.int32)
            new_values[lat_k[fresh], rank_k[fresh]] = vals.to(torch.float16)
            new_hidden[lat_k[fresh], rank_k[fresh]] = hid.to(torch.int32)
        empty = torch.isinf(new_keys)
        new_tokens[empty], new_values[empty], new_hidden[empty] = -1, 0, -1
        self.keys, self.tokens, self.values, self.hidden = new_keys, new_tokens, new_values, new_hidden

    def entries(self, latent: int) -> list[tuple[list[int], list[float], int, int]]:
        """``(tokens, values, hidden, centre)`` of one latent's filled entries, best first; tokens outside the
        text are dropped and ``centre`` is the window's centre in what is left."""
        out = []
        half = (self.width - 1) // 2
        for s in range(self.size):
            if math.isinf(float(self.keys[latent, s])):
                break
            toks, vals = self.tokens[latent, s], self.values[latent, s].float()
            inside = toks >= 0
            centre = half - int((~inside[:half]).sum())
            out.append((toks[inside].tolist(), vals[inside].tolist(), int(self.hidden[latent, s]), centre))
        return out


@dataclass
class FeatureStats:
    """The accumulated statistics of one pass (see :func:`collect`)."""

    #: positions seen (non-pad, non-special) and, per latent, how many of them it fired on
    positions: int
    fired: Tensor
    #: ``[n, len(HIST_EDGES) - 1]`` counts of the non-zero activations per bin; ``[n]`` largest activation
    histogram: Tensor
    max_act: Tensor
    top: WindowStore
    importance: WindowStore
    #: ``[R, W]`` int32 random windows (tokens only; −1 outside the text)
    random_windows: Tensor


def _count_firings(values: Tensor, indices: Tensor, fired: Tensor, hist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Add the firings (value > 0) of a Top-K code ``values / indices [..., k]`` (on the CPU) to the per-latent
    counts ``fired [n]`` and histogram ``hist [n, bins]``; returns ``(latents [F], values [F], fired mask)``
    of the flattened code."""
    flat_v, flat_i = values.reshape(-1), indices.reshape(-1)
    on = flat_v > 0
    lat, val = flat_i[on], flat_v[on]
    fired += torch.bincount(lat, minlength=fired.shape[0])
    hist.view(-1).scatter_add_(0, lat * hist.shape[1] + torch.bucketize(val, HIST_EDGES[1:-1]), torch.ones_like(lat))
    return lat, val, on


def _centre_offsets(window: int) -> Tensor:
    return torch.arange(-window, window + 1)


def _columns(flat_pos: Tensor, T: int, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For flat (row, position) indices ``[c]`` of a ``[B, T]`` batch: ``(rows [c], positions [c], window
    columns [c, W] clamped into the row, inside [c, W] bool)``."""
    b, t = flat_pos // T, flat_pos % T
    cols = t[:, None] + offsets
    return b, t, cols.clamp(0, T - 1), (cols >= 0) & (cols < T)


def collect(sae, batches: Iterable[tuple[Tensor, Tensor, Tensor, Tensor | None]], *, top_n: int = 12,
            importance_n: int = 7, random_n: int = 64, window: int = 10, seed: int = 0) -> FeatureStats:
    """One pass over ``batches`` of ``(activations [B, T, d], token ids [B, T], keep [B, T] bool, hidden
    [B, T] or None)``: ``keep`` marks the positions that count (the others are zeroed); ``hidden`` the clean
    token at masked positions. Windows show ``token ids`` (the model's input, [MASK]s included)."""
    n, W = sae.n, 2 * window + 1
    gen = torch.Generator().manual_seed(seed)
    top, imp = WindowStore(n, top_n, W), WindowStore(n, 2 * importance_n, W)   # spare room: top entries drop later
    fired = torch.zeros(n, dtype=torch.long)
    hist = torch.zeros(n, len(HIST_EDGES) - 1, dtype=torch.long)
    max_act = torch.zeros(n)
    rand_keys = torch.full((random_n,), -math.inf)
    rand_windows = torch.full((random_n, W), -1, dtype=torch.int32)
    positions = 0
    offsets = _centre_offsets(window)
    for acts, ids, keep, hidden in batches:
        B, T, _ = acts.shape
        with torch.no_grad():
            values, indices = sae.encode(acts.to(sae.W_enc.dtype))
        values = values.float().cpu() * keep.cpu()[..., None]
        indices, ids, keep = indices.cpu(), ids.cpu(), keep.cpu()
        positions += int(keep.sum())
        lat, val, on = _count_firings(values, indices, fired, hist)
        pos = on.nonzero()[:, 0] // values.shape[-1]                              # flat (b, t) of each entry
        max_act = torch.maximum(max_act, torch.zeros(n).scatter_reduce(0, lat, val, "amax"))

        def windows(idx: Tensor, _lat=lat, _pos=pos):
            b, t, colc, inside = _columns(_pos[idx], T, offsets)
            toks = torch.where(inside, ids[b[:, None], colc], torch.full_like(colc, -1))
            hit = (indices[b[:, None], colc] == _lat[idx][:, None, None])         # [c, W, k]
            vals = (values[b[:, None], colc] * hit).sum(-1) * inside
            hid = hidden.cpu()[b, t] if hidden is not None else torch.full_like(b, -1)
            return toks, vals, hid

        top.offer(lat, val, windows)
        u = torch.rand(val.shape, generator=gen).clamp_min(1e-12)
        imp.offer(lat, torch.log(u) / val, windows)                              # A-Res keys, log scale
        # random windows: a uniform reservoir over kept positions
        kept = keep.reshape(-1).nonzero()[:, 0]
        if kept.numel() and random_n:
            rk = torch.rand(kept.shape, generator=gen)
            allk = torch.cat([rand_keys, rk])
            best = allk.topk(min(random_n, allk.numel())).indices
            new_w = torch.full((random_n, W), -1, dtype=torch.int32)
            old = best < random_n
            new_w[old] = rand_windows[best[old]]
            b, _, colc, inside = _columns(kept[best[~old] - random_n], T, offsets)
            new_w[~old] = torch.where(inside, ids[b[:, None], colc], -1).to(torch.int32)
            rand_keys, rand_windows = allk[best], new_w
    return FeatureStats(positions, fired, hist, max_act, top, imp, rand_windows[~torch.isinf(rand_keys)])


def activation_stats(sae, stream: Iterable[Tensor]) -> dict:
    """Frequency and histogram of every latent from a stream of ``[B, d]`` activations (a live or cached
    :class:`~dlmscope.data.activations.ActivationStream` layer view): ``{"positions", "fired", "histogram"}``."""
    n = sae.n
    fired = torch.zeros(n, dtype=torch.long)
    hist = torch.zeros(n, len(HIST_EDGES) - 1, dtype=torch.long)
    positions = 0
    for x in stream:
        with torch.no_grad():
            values, indices = sae.encode(x.to(sae.W_enc.dtype))
        _count_firings(values.float().cpu(), indices.cpu(), fired, hist)
        positions += x.shape[0]
    return {"positions": positions, "fired": fired, "histogram": hist}


def logit_effects(adapter, sae, latents: Sequence[int], top: int = 10) -> dict[int, dict]:
    """Per latent, the tokens its unit decoder row promotes and suppresses most through the unembedding
    (``W_U · v_f``, the logit lens without the final norm): ``{"promoted": [[token, value]], "suppressed":
    [...]}``."""
    W_U = adapter.model.get_output_embeddings().weight.detach().float().cpu()     # [V, d]
    W = sae.W_dec.detach().float().cpu()[list(latents)]
    effect = torch.nn.functional.normalize(W, dim=-1) @ W_U.T                      # [F, V]
    tok = adapter.tokenizer
    out = {}
    for f, row in zip(latents, effect):
        hi, lo = row.topk(top), (-row).topk(top)
        out[int(f)] = {"promoted": [[tok.convert_ids_to_tokens(int(i)), float(v)] for v, i in zip(*hi)],
                       "suppressed": [[tok.convert_ids_to_tokens(int(i)), -float(v)] for v, i in zip(*lo)]}
    return out


def _special_ids(tokenizer) -> list[int]:
    return [i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]


def model_batches(adapter, layer: int, token_batches: Iterable, *, masked_t: float | None = None, seed: int = 0):
    """``(activations, ids, keep, hidden)`` per LM batch for :func:`collect`: clean text (``masked_t`` None,
    every non-special position kept) or text corrupted at rate ``masked_t`` (only masked positions kept; ids
    show the [MASK]s; hidden holds the clean tokens)."""
    special = torch.tensor(_special_ids(adapter.tokenizer))
    gen = torch.Generator().manual_seed(seed)
    for item in token_batches:
        ids, am = split_batch(item)
        clean = ids
        if masked_t is None:
            inp, keep, hidden = ids, ~torch.isin(ids, special), None
        else:
            inp, keep = corrupt(ids, am, adapter.require_mask_token(), masked_t, generator=gen)
            hidden = clean
        if am is not None:
            keep = keep & am.bool()
        with torch.no_grad():
            h = adapter.forward_until(inp.to(adapter.device), [layer],
                                      attention_mask=None if am is None else am.to(adapter.device))[layer]
        yield h, inp, keep, hidden


def _signature(toks, vals) -> tuple:
    return tuple(toks), tuple(round(v, 3) for v in vals)


def _windows(tokenizer, store: WindowStore, f: int, limit: int | None = None, exclude: set | None = None
             ) -> list[dict]:
    """One latent's windows as report dicts (``tokens``, ``values``, ``centre``, and ``hidden`` for masked
    windows), skipping those whose signature is in ``exclude``."""
    out = []
    for toks, vals, hid, centre in store.entries(f):
        if exclude is not None and _signature(toks, vals) in exclude:
            continue
        d = {"tokens": tokenizer.convert_ids_to_tokens(toks), "values": [round(v, 4) for v in vals],
             "centre": centre}
        if hid >= 0:
            d["hidden"] = tokenizer.convert_ids_to_tokens(hid)
        out.append(d)
        if limit is not None and len(out) == limit:
            break
    return out


def feature_report(adapter, sae, layer: int, token_batches: Sequence, *, latents: Sequence[int] | None = None,
                   sample: int | None = 100, top_n: int = 12, importance_n: int = 7, window: int = 10,
                   masked_t: float | None = 0.3, min_fired: int = 16, seed: int = 0, policy: str = "",
                   model_name: str = "") -> dict:
    """The JSON-able feature report: header fields and ``latents[str(id)]`` with frequency, histogram, top and
    importance windows, logit effects and (DLMs, ``masked_t`` not None) the masked-position statistics.
    ``latents`` picks the latents; otherwise ``sample`` of the alive ones (fired ≥ ``min_fired``, the paper's
    > 15), drawn with ``seed`` (None: all alive). ``token_batches`` is re-iterated for the masked pass."""
    adapter.check_layer(layer)
    if sae.d != adapter.d_model:
        raise ValueError(f"SAE input size d={sae.d} does not match the model's hidden size {adapter.d_model}")
    tok = adapter.tokenizer
    clean = collect(sae, model_batches(adapter, layer, token_batches), top_n=top_n, importance_n=importance_n,
                    window=window, seed=seed)
    alive = (clean.fired >= min_fired).nonzero()[:, 0].tolist()
    if latents is None:
        chosen = alive
        if sample is not None and len(alive) > sample:
            perm = torch.randperm(len(alive), generator=torch.Generator().manual_seed(seed))[:sample]
            chosen = sorted(alive[i] for i in perm.tolist())
    else:
        chosen = sorted({int(f) for f in latents})
        bad = [f for f in chosen if not 0 <= f < sae.n]
        if bad:
            raise ValueError(f"latent {bad[0]} out of range for an SAE with n={sae.n}")
    masked = None
    if masked_t is not None and adapter.is_diffusion:
        masked = collect(sae, model_batches(adapter, layer, token_batches, masked_t=masked_t, seed=seed + 1),
                         top_n=top_n, importance_n=0, random_n=0, window=window, seed=seed + 1)
    effects = logit_effects(adapter, sae, chosen) if chosen else {}
    report = {"model": model_name or str(getattr(adapter, "source", "")), "layer": layer, "policy": policy,
              "n_latents": sae.n, "k": sae.k, "tokens_seen": clean.positions, "is_diffusion": adapter.is_diffusion,
              "alive": len(alive), "window": window, "hist_edges": HIST_EDGES.tolist(),
              "random_windows": [{"tokens": tok.convert_ids_to_tokens(w[w >= 0].tolist())}
                                 for w in clean.random_windows],
              "latents": {}}
    for f in chosen:
        top = _windows(tok, clean.top, f)
        seen = {_signature(t, v) for t, v, _, _ in clean.top.entries(f)}       # IW samples exclude the top ones
        entry = {"latent": f, "frequency": int(clean.fired[f]) / max(clean.positions, 1),
                 "n_fired": int(clean.fired[f]), "max_act": float(clean.max_act[f]),
                 "histogram": {"edges": HIST_EDGES.tolist(), "counts": clean.histogram[f].tolist()},
                 "top": top, "importance": _windows(tok, clean.importance, f, importance_n, exclude=seen),
                 "logits": effects[f]}
        if masked is not None:
            mtop = _windows(tok, masked.top, f)
            counts: dict[str, int] = {}
            for w in mtop:
                if "hidden" in w:
                    counts[w["hidden"]] = counts.get(w["hidden"], 0) + 1
            entry["masked"] = {"frequency": int(masked.fired[f]) / max(masked.positions, 1),
                               "n_fired": int(masked.fired[f]), "max_act": float(masked.max_act[f]), "top": mtop,
                               "hidden_tokens": sorted(([t, c] for t, c in counts.items()), key=lambda x: -x[1])}
        report["latents"][str(f)] = entry
    return report
