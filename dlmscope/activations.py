"""Harvesting activations for SAE training: mask policies, truncated forward, shuffle buffer, disk cache.

Which positions train the SAE (REFERENCE.md §3). Per LM batch draw ``p ~ U[t_min, t_max]`` (one scalar per
batch, defaults 0.05 / 0.5), replace every non-pad position except position 0 by the mask token independently
with probability ``p``, run **one** forward pass (truncated after the deepest hooked layer, via
``adapter.forward_until``) and keep the resid_post activations of the positions the policy selects:

===========  ====================================================================================
``mask``     masked positions only ("Mask-SAE")
``unmask``   unmasked non-pad positions, position 0 included ("Unmask-SAE")
``all``      every non-pad position of the masked input
``clean``    no masking at all, every non-pad position (what AR models use)
===========  ====================================================================================

Pad positions (``attention_mask == 0``) are never masked and never kept; without an attention mask every
position counts as text (pad is not inferred from token ids: Dream's pad id equals its EOS id). A policy that
needs a mask token on a model without one (an AR baseline) raises ValueError.

Streams. :class:`ActivationStream` yields ``dict[layer, Tensor[batch_size, d]]``: one harvest feeds every
hooked layer, and the rows of all layers in one yielded dict come from the same token positions (one shared
shuffle permutation). ``stream.for_layer(L)`` is the ``[B, d]`` view the :class:`~dlmscope.train.Trainer`
takes. Iterating again replays the exact same batches (everything is seeded), so training one trainer per
layer in sequence works: either re-run the model each time, or pass ``cache_dir`` so that the first full pass
writes the activations to disk and every later pass (any layer) reads them back without the model.

Shuffle buffer. Activations are buffered up to ``buffer_tokens`` rows, permuted with a seeded generator, and
handed out in batches of exactly ``batch_size`` until the buffer is half empty; then it is refilled (the
left-over rows are shuffled again with the new ones). When the source ends, the buffer is drained; the final
partial batch is dropped unless ``drop_last=False``. Every harvested token is yielded exactly once per pass
(``drop_last=False``) and the output depends only on the token sequence, not on how it was chunked, so the
live stream and the cached stream are identical.

Disk cache (``cache_dir``): ``shard_00000.safetensors`` … with one tensor ``layer_{L}`` ``[n_i, d]`` per layer,
each written atomically (tmp file + rename), and ``index.json`` (written last, atomically) listing the shards,
their token counts and the harvest settings. A directory without ``index.json`` is an incomplete cache and is
rebuilt. :meth:`ActivationStream.from_cache` streams a cache with no model at all.

Host syncs: the corruption (``p``, the Bernoulli mask) is drawn on the generator's device (CPU by default)
so the kept-position indices are known on the host without a device sync when the tokens live on the host;
writing the cache copies activations to the host (necessary).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from . import atomic

__all__ = [
    "POLICIES",
    "check_policy",
    "corrupt",
    "keep_mask",
    "harvest",
    "shuffle_batches",
    "ActivationStream",
    "CachedActivationStream",
    "LayerStream",
    "collect",
    "write_cache",
    "read_cache",
    "load_cache_index",
]

POLICIES = ("mask", "unmask", "all", "clean")
CACHE_VERSION = 1
INDEX_FILE = "index.json"


# ------------------------------------------------------------------------------------------------ policies
def check_policy(policy: Any) -> str:
    """``policy`` if it is one of :data:`POLICIES`, else a ValueError naming the valid ones."""
    if not isinstance(policy, str) or policy not in POLICIES:
        hint = ""
        if isinstance(policy, str):
            import difflib

            close = difflib.get_close_matches(policy.lower(), POLICIES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown mask policy {policy!r}{hint}; valid policies: {', '.join(POLICIES)}")
    return policy


def _check_t_range(t_min: float, t_max: float) -> tuple[float, float]:
    t_min, t_max = float(t_min), float(t_max)
    if not 0.0 < t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 < t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    return t_min, t_max


def _check_batching(batch_size: Any, buffer_tokens: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(buffer_tokens, bool) or not isinstance(buffer_tokens, int) or buffer_tokens < batch_size:
        raise ValueError(f"buffer_tokens must be an int >= batch_size ({batch_size}), got {buffer_tokens!r}")


def _split_batch(item: Any) -> tuple[Tensor, Tensor | None]:
    """(input_ids, attention_mask) from a tensor, an (ids, mask) pair or a mapping with those keys."""
    if isinstance(item, Tensor):
        ids, mask = item, None
    elif isinstance(item, Mapping) or (hasattr(item, "keys") and hasattr(item, "__getitem__")):
        if "input_ids" not in item:
            raise ValueError(f"token batch mapping has no 'input_ids' (keys: {sorted(item.keys())})")
        ids, mask = item["input_ids"], item.get("attention_mask") if hasattr(item, "get") else None
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        ids, mask = item
    else:
        raise ValueError(
            "token batches must be [B, T] id tensors, (input_ids, attention_mask) pairs or mappings with "
            f"'input_ids', got {type(item).__name__}"
        )
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be a [B, T] integer tensor, got {getattr(ids, 'shape', type(ids))}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != ids.shape:
            raise ValueError(f"attention_mask must be a tensor of shape {tuple(ids.shape)}")
    return ids, mask


def _valid_positions(input_ids: Tensor, attention_mask: Tensor | None, device) -> Tensor:
    if attention_mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=device)
    return attention_mask.to(device=device) != 0


def corrupt(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    mask_token_id: int,
    t: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mask every non-pad position except position 0 independently with probability ``t``.

    Returns ``(noisy_ids, masked)`` with ``masked`` a bool ``[B, T]`` tensor. The random draw happens on the
    generator's device (CPU when ``generator`` is None) and the results are moved to ``input_ids``' device.
    """
    gdev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(input_ids.shape, generator=generator, device=gdev)
    eligible = _valid_positions(input_ids, attention_mask, gdev)
    eligible[:, 0] = False
    masked = (u < t) & eligible
    masked = masked.to(input_ids.device, non_blocking=True)
    noisy = input_ids.masked_fill(masked, int(mask_token_id))
    return noisy, masked


def keep_mask(policy: str, valid: Tensor, masked: Tensor | None) -> Tensor:
    """Bool ``[B, T]`` of the positions a policy keeps, from the non-pad positions and the masked ones."""
    policy = check_policy(policy)
    if policy in ("clean", "all") or masked is None:
        return valid.clone()
    if policy == "mask":
        return valid & masked
    return valid & ~masked  # unmask


def _draw_t(t_min: float, t_max: float, generator: torch.Generator | None) -> float:
    gdev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((), generator=generator, device=gdev)
    return t_min + (t_max - t_min) * float(u)  # a host scalar: no device sync with a CPU generator


@torch.no_grad()
def harvest(
    adapter,
    input_ids: Tensor,
    layers: int | Iterable[int],
    policy: str = "mask",
    *,
    attention_mask: Tensor | None = None,
    t_min: float = 0.05,
    t_max: float = 0.5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    return_info: bool = False,
):
    """Kept activations of one LM batch: ``dict[layer, Tensor[n_kept, d]]`` (rows in (batch, position) order).

    One forward of the (possibly masked) batch through ``adapter.forward_until`` (blocks after the deepest
    hooked layer never run). With ``return_info=True`` also returns ``{"t", "masked", "keep", "noisy_ids"}``.
    """
    policy = check_policy(policy)
    layers = adapter.check_layers(layers) if hasattr(adapter, "check_layers") else sorted(set(layers))
    t_min, t_max = _check_t_range(t_min, t_max)
    model_device = _adapter_device(adapter)
    gdev = generator.device if generator is not None else torch.device("cpu")
    valid = _valid_positions(input_ids, attention_mask, gdev)
    if policy == "clean":
        t, masked, noisy = 0.0, None, input_ids
    else:
        mask_id = adapter.require_mask_token() if hasattr(adapter, "require_mask_token") else adapter.mask_token_id
        if mask_id is None:
            raise ValueError(f"policy {policy!r} needs a mask token, but this model has none; use policy 'clean'")
        t = _draw_t(t_min, t_max, generator)
        # corrupt where the random numbers are drawn, so `keep` below needs no device round trip
        am_g = attention_mask.to(gdev) if attention_mask is not None else None
        noisy, masked = corrupt(input_ids.to(gdev), am_g, mask_id, t, generator)
    keep = keep_mask(policy, valid, masked)
    idx = keep.reshape(-1).nonzero().squeeze(1)  # on the generator's device: host-side for a CPU generator
    idx = idx.to(model_device, non_blocking=True)
    am = attention_mask.to(model_device) if attention_mask is not None else None
    hidden = adapter.forward_until(noisy.to(model_device), layers, attention_mask=am)
    out = {}
    for layer in layers:
        h = hidden[layer]
        h = h.reshape(-1, h.shape[-1]).index_select(0, idx)
        out[layer] = h.to(dtype) if dtype is not None else h
    if return_info:
        return out, {"t": t, "masked": masked, "keep": keep, "noisy_ids": noisy}
    return out


def _adapter_device(adapter) -> torch.device:
    dev = getattr(adapter, "device", None)
    if dev is not None:
        return torch.device(dev)
    return next(adapter.model.parameters()).device


# ------------------------------------------------------------------------------------------ shuffle buffer
def _chunk_len(chunk: dict[int, Tensor]) -> int:
    return int(next(iter(chunk.values())).shape[0])


def _slice(chunk: dict[int, Tensor], start: int, stop: int) -> dict[int, Tensor]:
    return {k: v[start:stop] for k, v in chunk.items()}


def shuffle_batches(
    chunks: Iterable[dict[int, Tensor]],
    batch_size: int,
    buffer_tokens: int,
    *,
    seed: int = 0,
    drop_last: bool = True,
) -> Iterator[dict[int, Tensor]]:
    """Shuffle-buffer a sequence of ``{layer: [n_i, d]}`` chunks into ``{layer: [batch_size, d]}`` batches.

    The buffer fills to ``buffer_tokens`` rows, is permuted (seeded, one permutation shared by all layers) and
    yields batches until fewer than ``buffer_tokens // 2`` rows remain (never fewer than one full batch), then
    refills. At the end the rest is drained; the last partial batch is yielded only when ``drop_last=False``.
    The output depends only on the concatenated row sequence, not on chunk boundaries.
    """
    _check_batching(batch_size, buffer_tokens)
    gen = torch.Generator().manual_seed(int(seed))
    low_water = max(buffer_tokens // 2, batch_size)
    src = iter(chunks)
    carry: dict[int, Tensor] | None = None
    rest: dict[int, Tensor] | None = None
    exhausted = False
    while True:
        parts = [rest] if rest is not None else []
        n = _chunk_len(rest) if rest is not None else 0
        while n < buffer_tokens and not exhausted:
            if carry is None:
                carry = next(src, None)
                if carry is None:
                    exhausted = True
                    break
            m = _chunk_len(carry)
            take = min(m, buffer_tokens - n)
            if take > 0:
                parts.append(_slice(carry, 0, take) if take < m else carry)
                n += take
            carry = _slice(carry, take, m) if take < m else None
        if n == 0:
            return
        keys = list(parts[0].keys())
        buf = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in keys}
        perm = torch.randperm(n, generator=gen)
        perm = perm.to(buf[keys[0]].device, non_blocking=True)
        buf = {k: v.index_select(0, perm) for k, v in buf.items()}
        pos = 0
        stop_at = 0 if exhausted else low_water
        while n - pos >= batch_size and n - pos > stop_at:
            yield _slice(buf, pos, pos + batch_size)
            pos += batch_size
        if exhausted:
            if n - pos > 0 and not drop_last:
                yield _slice(buf, pos, n)
            return
        rest = _slice(buf, pos, n) if pos < n else None


# ---------------------------------------------------------------------------------------------- disk cache
def write_cache(
    chunks: Iterable[dict[int, Tensor]],
    cache_dir: str | os.PathLike,
    *,
    shard_tokens: int = 65536,
    meta: dict | None = None,
) -> Iterator[dict[int, Tensor]]:
    """Pass ``chunks`` through unchanged while writing them to ``cache_dir`` as safetensors shards.

    ``index.json`` is written (atomically) only after the source is exhausted, so an interrupted pass leaves
    no index and the cache counts as incomplete. Any old index is removed first.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    cache_dir = os.fspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    index_path = os.path.join(cache_dir, INDEX_FILE)
    if os.path.exists(index_path):
        os.remove(index_path)
    pending: list[dict[int, Tensor]] = []
    n_pending = 0
    shards: list[dict] = []
    layers: list[int] | None = None
    d = None
    dtype = None

    def flush():
        nonlocal pending, n_pending
        if not n_pending:
            return
        name = f"shard_{len(shards):05d}.safetensors"
        tensors = {f"layer_{k}": torch.cat([p[k] for p in pending]).detach().to("cpu").contiguous()
                   for k in layers}
        atomic.save_safetensors(os.path.join(cache_dir, name), tensors)
        shards.append({"file": name, "tokens": n_pending})
        pending, n_pending = [], 0

    for chunk in chunks:
        if layers is None:
            layers = sorted(chunk.keys())
            first = chunk[layers[0]]
            d, dtype = int(first.shape[-1]), first.dtype
        m = _chunk_len(chunk)
        pos = 0
        while pos < m:
            take = min(m - pos, shard_tokens - n_pending)
            pending.append(_slice(chunk, pos, pos + take))
            n_pending += take
            pos += take
            if n_pending >= shard_tokens:
                flush()
        yield chunk
    flush()
    index = {
        "version": CACHE_VERSION,
        "layers": layers or [],
        "d": d,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "total_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "meta": dict(meta or {}),
    }
    atomic.write_json(index_path, index)


def load_cache_index(cache_dir: str | os.PathLike) -> dict:
    """The ``index.json`` of a complete cache (FileNotFoundError if absent: missing or incomplete cache)."""
    path = os.path.join(os.fspath(cache_dir), INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(cache_dir)!r} holds no complete activation cache (no {INDEX_FILE})")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("version") != CACHE_VERSION:
        raise ValueError(f"{path}: unsupported cache version {index.get('version')!r}")
    return index


def _cache_layers(index: dict, layers, source: str) -> list[int]:
    have = [int(x) for x in index["layers"]]
    if layers is None:
        return have
    layers = sorted({int(x) for x in ([layers] if isinstance(layers, int) else layers)})
    missing = [x for x in layers if x not in have]
    if missing:
        raise ValueError(f"activation cache {source!r} has layers {have}, not {missing}")
    return layers


def read_cache(
    cache_dir: str | os.PathLike,
    layers: int | Iterable[int] | None = None,
    *,
    device: str | torch.device | None = None,
) -> Iterator[dict[int, Tensor]]:
    """Chunks ``{layer: [n_i, d]}`` of a complete cache, one shard at a time (only the requested layers read)."""
    from safetensors import safe_open

    cache_dir = os.fspath(cache_dir)
    index = load_cache_index(cache_dir)
    layers = _cache_layers(index, layers, cache_dir)
    for shard in index["shards"]:
        path = os.path.join(cache_dir, shard["file"])
        with safe_open(path, framework="pt", device="cpu") as f:
            chunk = {k: f.get_tensor(f"layer_{k}") for k in layers}
        if device is not None:
            chunk = {k: v.to(device) for k, v in chunk.items()}
        yield chunk


# ------------------------------------------------------------------------------------------------- streams
class LayerStream:
    """The ``[B, d]`` batches of one layer of a multi-layer stream (what ``Trainer.fit`` takes)."""

    def __init__(self, parent, layer: int):
        self.parent = parent
        self.layer = int(layer)

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.parent._iter_layers([self.layer]):
            yield batch[self.layer]


class _CachedLayerStream(LayerStream):
    def __len__(self) -> int:
        return len(self.parent)


class ActivationStream:
    """Seeded, shuffled activation batches harvested live from a model (optionally cached on disk).

    Parameters
    ----------
    adapter: a :mod:`dlmscope.models` adapter.
    token_batches: re-iterable of token batches: ``[B, T]`` id tensors, ``(input_ids, attention_mask)`` pairs or
        mappings with ``input_ids`` (and ``attention_mask``). Must be re-iterable (a list, a DataLoader) to be
        iterated more than once.
    layers: the hooked layers (resid_post of each block); validated against the model.
    policy: ``mask | unmask | all | clean``.
    batch_size / buffer_tokens / seed / drop_last: see :func:`shuffle_batches`.
    t_min / t_max: the masking-rate range.
    dtype: cast the harvested activations (e.g. ``torch.float32``); default: the model's dtype.
    device: where the buffer and the yielded batches live (default: the model's device).
    max_tokens: stop harvesting after this many kept tokens (per pass).
    cache_dir / shard_tokens: optional disk cache (see the module docstring). A complete cache there is used
        as is (its layers must cover ``layers``); otherwise the next full pass writes it.

    Iterating yields ``dict[layer, Tensor[batch_size, d]]``; :meth:`for_layer` gives one layer's ``[B, d]``
    stream. Every pass replays the same batches.
    """

    def __init__(
        self,
        adapter,
        token_batches: Iterable,
        layers: int | Iterable[int],
        policy: str = "mask",
        batch_size: int = 2048,
        buffer_tokens: int = 262_144,
        seed: int = 0,
        *,
        t_min: float = 0.05,
        t_max: float = 0.5,
        drop_last: bool = True,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_tokens: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        shard_tokens: int = 65536,
    ):
        self.policy = check_policy(policy)
        self.adapter = adapter
        self.layers = adapter.check_layers(layers)
        if self.policy != "clean":
            mask_id = adapter.mask_token_id
            if mask_id is None:
                adapter.require_mask_token()  # raises with the model-specific message
        self.t_min, self.t_max = _check_t_range(t_min, t_max)
        _check_batching(batch_size, buffer_tokens)
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        self.token_batches = token_batches
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.max_tokens = max_tokens
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.shard_tokens = int(shard_tokens)
        self._passes = 0

    # -- construction from a cache ---------------------------------------------------------------------
    @staticmethod
    def from_cache(cache_dir, layers=None, batch_size: int = 2048, buffer_tokens: int = 262_144, seed: int = 0,
                   *, drop_last: bool = True, device=None) -> "CachedActivationStream":
        """A stream over a complete on-disk cache; no model needed."""
        return CachedActivationStream(cache_dir, layers, batch_size, buffer_tokens, seed, drop_last=drop_last,
                                      device=device)

    # -- harvesting --------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"policy": self.policy, "t_min": self.t_min, "t_max": self.t_max, "seed": self.seed,
                "source": str(getattr(self.adapter, "source", "")), "max_tokens": self.max_tokens}

    def harvest_chunks(self) -> Iterator[dict[int, Tensor]]:
        """Unshuffled kept activations, one ``{layer: [n_i, d]}`` chunk per LM batch (seeded corruption)."""
        gen = torch.Generator().manual_seed(self.seed)
        produced = 0
        any_batch = False
        for item in self.token_batches:
            any_batch = True
            ids, am = _split_batch(item)
            chunk = harvest(self.adapter, ids, self.layers, self.policy, attention_mask=am, t_min=self.t_min,
                            t_max=self.t_max, generator=gen, dtype=self.dtype)
            if self.device is not None:
                chunk = {k: v.to(self.device, non_blocking=True) for k, v in chunk.items()}
            m = _chunk_len(chunk)
            if self.max_tokens is not None and produced + m >= self.max_tokens:
                yield _slice(chunk, 0, self.max_tokens - produced)
                produced = self.max_tokens
                break
            produced += m
            if m:
                yield chunk
        if not any_batch and self._passes > 1:
            raise ValueError("token_batches yielded nothing on this pass: pass a re-iterable (list, DataLoader), "
                             "not a one-shot iterator, to iterate the stream more than once")

    def _cache_complete(self) -> bool:
        if self.cache_dir is None:
            return False
        try:
            index = load_cache_index(self.cache_dir)
        except FileNotFoundError:
            return False
        stored = index.get("meta", {})
        for key, want in self.meta().items():
            if key != "source" and key in stored and stored[key] != want:
                raise ValueError(f"activation cache {self.cache_dir!r} was harvested with {key}={stored[key]!r}, "
                                 f"not {want!r}; use another cache_dir or delete this one")
        _cache_layers(index, self.layers, self.cache_dir)
        return True

    def _chunks(self, layers: list[int]) -> Iterator[dict[int, Tensor]]:
        self._passes += 1
        if self._cache_complete():
            return read_cache(self.cache_dir, layers, device=self.device or _adapter_device(self.adapter))
        chunks = self.harvest_chunks()
        if self.cache_dir is not None:
            chunks = write_cache(chunks, self.cache_dir, shard_tokens=self.shard_tokens, meta=self.meta())
        if layers != self.layers:
            chunks = ({k: c[k] for k in layers} for c in chunks)
        return chunks

    def _iter_layers(self, layers: list[int]) -> Iterator[dict[int, Tensor]]:
        return shuffle_batches(self._chunks(layers), self.batch_size, self.buffer_tokens, seed=self.seed + 1,
                               drop_last=self.drop_last)

    def __iter__(self) -> Iterator[dict[int, Tensor]]:
        return self._iter_layers(list(self.layers))

    def for_layer(self, layer: int) -> LayerStream:
        """The ``[batch_size, d]`` batches of one hooked layer (re-iterable; each pass replays the same)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer!r} is not hooked by this stream (layers {self.layers})")
        return LayerStream(self, layer)

    def build_cache(self) -> "CachedActivationStream":
        """Harvest everything once into ``cache_dir`` (no shuffling) and return the cached stream."""
        if self.cache_dir is None:
            raise ValueError("build_cache needs cache_dir")
        if not self._cache_complete():
            for _ in write_cache(self.harvest_chunks(), self.cache_dir, shard_tokens=self.shard_tokens,
                                 meta=self.meta()):
                pass
        return CachedActivationStream(self.cache_dir, self.layers, self.batch_size, self.buffer_tokens, self.seed,
                                      drop_last=self.drop_last, device=self.device)


class CachedActivationStream:
    """Shuffled batches read from a complete activation cache; has ``len()`` (the number of batches).

    Same seed and batch settings as the live :class:`ActivationStream` that wrote the cache → the same batches.
    """

    def __init__(self, cache_dir, layers=None, batch_size: int = 2048, buffer_tokens: int = 262_144,
                 seed: int = 0, *, drop_last: bool = True, device=None):
        self.cache_dir = os.fspath(cache_dir)
        self.index = load_cache_index(self.cache_dir)
        self.layers = _cache_layers(self.index, layers, self.cache_dir)
        _check_batching(batch_size, buffer_tokens)
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.device = torch.device(device) if device is not None else None

    @property
    def total_tokens(self) -> int:
        return int(self.index["total_tokens"])

    @property
    def meta(self) -> dict:
        return dict(self.index.get("meta", {}))

    def __len__(self) -> int:
        full = self.total_tokens // self.batch_size
        return full + (0 if self.drop_last or self.total_tokens % self.batch_size == 0 else 1)

    def _iter_layers(self, layers: list[int]) -> Iterator[dict[int, Tensor]]:
        return shuffle_batches(read_cache(self.cache_dir, layers, device=self.device), self.batch_size,
                               self.buffer_tokens, seed=self.seed + 1, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[dict[int, Tensor]]:
        return self._iter_layers(list(self.layers))

    def for_layer(self, layer: int) -> LayerStream:
        if layer not in self.layers:
            raise ValueError(f"layer {layer!r} is not in this cache's stream (layers {self.layers})")
        return _CachedLayerStream(self, layer)


def collect(stream: Iterable[dict[int, Tensor]]) -> dict[int, Tensor]:
    """One pass of a multi-layer stream concatenated: ``{layer: [N, d]}`` (e.g. held-out data that several
    SAEs are evaluated on, harvested once instead of once per SAE)."""
    parts: dict[int, list[Tensor]] = {}
    for batch in stream:
        for layer, x in batch.items():
            parts.setdefault(layer, []).append(x)
    if not parts:
        raise ValueError("collect: the stream yielded no batches")
    return {layer: torch.cat(xs) for layer, xs in parts.items()}
