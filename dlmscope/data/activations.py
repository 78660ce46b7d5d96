"""Harvesting activations for SAE training: mask policies, the truncated forward, the live stream.

Which positions train the SAE (docs/reference.md §3). Per LM batch the corruption of :mod:`dlmscope.data.noise` masks
the text (one rate ``t ~ U[t_min, t_max]`` per batch), **one** forward pass runs (truncated after the deepest
hooked layer, via ``adapter.forward_until``) and the resid_post activations of the positions the policy
selects are kept:

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
hooked layer, and the rows of all layers in one yielded dict come from the same token positions (the shuffle
buffer of :mod:`dlmscope.data.shuffle`). ``stream.for_layer(L)`` is the ``[B, d]`` view the
:class:`~dlmscope.train.trainer.Trainer` takes. Iterating again replays the exact same batches (everything is seeded),
so training one trainer per layer in sequence works: either re-run the model each time, or pass ``cache_dir``
so that the first full pass writes the activations to disk (:mod:`dlmscope.data.cache`) and every later
pass (any layer) reads them back without the model.

Host syncs: the corruption is drawn on the generator's device (CPU by default) so the kept-position indices
are known on the host without a device sync when the tokens live on the host; writing the cache copies
activations to the host (necessary).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from dlmscope.util.choices import check_choice
from dlmscope.util.identity import differences
from .cache import CachedActivationStream, cache_layers, dtype_name, load_cache_index, read_cache, write_cache
from .noise import T_MAX, T_MIN, check_t_range, corrupt, draw_t, generator_device, valid_positions
from .shuffle import LayerStream, check_batching, chunk_len, shuffle_batches, slice_chunk

__all__ = [
    "POLICIES",
    "check_policy",
    "split_batch",
    "keep_mask",
    "harvest",
    "model_identity",
    "ActivationStream",
]

POLICIES = ("mask", "unmask", "all", "clean")
#: the files whose names and sizes stand for a model folder's weights in :func:`model_identity`
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".index.json")
#: the tokenizer files whose names and sizes :func:`model_identity` records (they turn the text into ids)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


# ------------------------------------------------------------------------------------------------ policies
def check_policy(policy: Any) -> str:
    """``policy`` if it is one of :data:`POLICIES`, else a ValueError naming the valid ones and the nearest."""
    return check_choice("mask policy", policy, POLICIES, valid="policies")


def split_batch(item: Any) -> tuple[Tensor, Tensor | None]:
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


def keep_mask(policy: str, valid: Tensor, masked: Tensor | None) -> Tensor:
    """Bool ``[B, T]`` of the positions a policy keeps, from the non-pad positions and the masked ones."""
    policy = check_policy(policy)
    if policy in ("clean", "all") or masked is None:
        return valid.clone()
    if policy == "mask":
        return valid & masked
    return valid & ~masked  # unmask


@torch.no_grad()
def harvest(
    adapter,
    input_ids: Tensor,
    layers: int | Iterable[int],
    policy: str = "mask",
    *,
    attention_mask: Tensor | None = None,
    t_min: float = T_MIN,
    t_max: float = T_MAX,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    return_info: bool = False,
):
    """Kept activations of one LM batch: ``dict[layer, Tensor[n_kept, d]]`` (rows in (batch, position) order).

    One forward of the (possibly masked) batch through ``adapter.forward_until`` (blocks after the deepest
    hooked layer never run). With ``return_info=True`` also returns ``{"t", "masked", "keep", "noisy_ids"}``.
    """
    policy = check_policy(policy)
    layers = adapter.check_layers(layers)
    t_min, t_max = check_t_range(t_min, t_max)
    model_device = _adapter_device(adapter)
    gdev = generator_device(generator)
    valid = valid_positions(input_ids, attention_mask, gdev)
    if policy == "clean":
        t, masked, noisy = 0.0, None, input_ids
    else:
        mask_id = adapter.require_mask_token()  # raises, naming the model, when there is none
        t = draw_t(t_min, t_max, generator)
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


def model_identity(adapter) -> dict:
    """What tells ``adapter``'s weights from another model's, cheaply (no weight is read): its folder, resolved,
    a SHA-256 of its ``config.json`` and the names and sizes of its weight and tokenizer files. An adapter without
    a folder is named by its source and a hash of its config object."""
    source = str(getattr(adapter, "source", ""))
    if source and os.path.isdir(source):
        folder = os.path.realpath(source)
        config = os.path.join(folder, "config.json")
        digest = None
        if os.path.isfile(config):
            with open(config, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        files = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))
        weights = [[name, os.path.getsize(os.path.join(folder, name))] for name in files
                   if name.endswith(WEIGHT_SUFFIXES)]
        tokenizer = [[name, os.path.getsize(os.path.join(folder, name))] for name in files if name in TOKENIZER_FILES]
        return {"path": folder, "config_sha256": digest, "weights": weights, "tokenizer": tokenizer}
    config = getattr(getattr(adapter, "model", None), "config", None)
    to_dict = getattr(config, "to_dict", None)
    text = json.dumps(to_dict() if callable(to_dict) else repr(config), sort_keys=True, default=repr)
    return {"path": source, "config_sha256": hashlib.sha256(text.encode()).hexdigest(), "weights": None,
            "tokenizer": None}


def _as_json(value):
    """``value`` as it reads back from JSON (tuples become lists), so a fresh description compares to a stored one."""
    return json.loads(json.dumps(value, default=str))


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 160 else text[:157] + "..."


# ------------------------------------------------------------------------------------------------- streams
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
        as is (its layers must cover ``layers``); otherwise the next full pass writes it. The cache records what
        it was harvested from (:meth:`meta`): one harvested otherwise is refused (:meth:`check_cache`).
    text_source: a JSON description of what ``token_batches`` holds (corpus, split, ``seq_len``, LM batch size,
        ...), recorded in the cache and compared like the rest of :meth:`meta`; the stream cannot tell it from
        the batches themselves.

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
        t_min: float = T_MIN,
        t_max: float = T_MAX,
        drop_last: bool = True,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_tokens: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        shard_tokens: int = 65536,
        text_source: Mapping | None = None,
    ):
        self.policy = check_policy(policy)
        self.adapter = adapter
        self.layers = adapter.check_layers(layers)
        if self.policy != "clean":
            adapter.require_mask_token()  # raises, naming the model, when there is none
        self.t_min, self.t_max = check_t_range(t_min, t_max)
        check_batching(batch_size, buffer_tokens)
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
        if text_source is not None and not isinstance(text_source, Mapping):
            raise ValueError(f"text_source must be a mapping or None, got {type(text_source).__name__}")
        self.text_source = _as_json(dict(text_source)) if text_source is not None else None
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
        """What this harvest reads and how (recorded in its cache; a cache must match it on every key but
        ``source``, the model path as given, which ``model`` holds resolved)."""
        return _as_json({
            "policy": self.policy, "t_min": self.t_min, "t_max": self.t_max, "seed": self.seed,
            "source": str(getattr(self.adapter, "source", "")), "max_tokens": self.max_tokens,
            "model": model_identity(self.adapter), "d": getattr(self.adapter, "d_model", None),
            "dtype": dtype_name(self.dtype) if self.dtype is not None else None, "text": self.text_source,
        })

    def harvest_chunks(self) -> Iterator[dict[int, Tensor]]:
        """Unshuffled kept activations, one ``{layer: [n_i, d]}`` chunk per LM batch (seeded corruption)."""
        gen = torch.Generator().manual_seed(self.seed)
        produced = 0
        any_batch = False
        for item in self.token_batches:
            any_batch = True
            ids, am = split_batch(item)
            chunk = harvest(self.adapter, ids, self.layers, self.policy, attention_mask=am, t_min=self.t_min,
                            t_max=self.t_max, generator=gen, dtype=self.dtype)
            if self.device is not None:
                chunk = {k: v.to(self.device, non_blocking=True) for k, v in chunk.items()}
            m = chunk_len(chunk)
            if self.max_tokens is not None and produced + m >= self.max_tokens:
                yield slice_chunk(chunk, 0, self.max_tokens - produced)
                produced = self.max_tokens
                break
            produced += m
            if m:
                yield chunk
        if not any_batch and self._passes > 1:
            raise ValueError("token_batches yielded nothing on this pass: pass a re-iterable (list, DataLoader), "
                             "not a one-shot iterator, to iterate the stream more than once")

    def check_cache(self) -> bool:
        """True when ``cache_dir`` holds a complete cache of this very harvest (then it is read, not harvested);
        False when there is none to read (no ``cache_dir``, or no complete cache: the next full pass writes one).

        A complete cache of another harvest (another model, text, packing, ``d``, policy, seed, ...) or one that
        does not record all of :meth:`meta` (an older format, which cannot show which model it holds) is refused:
        ValueError naming what differs. Nothing is overwritten silently."""
        if self.cache_dir is None:
            return False
        try:
            index = load_cache_index(self.cache_dir)
        except FileNotFoundError:
            return False
        stored, want = index["meta"], self.meta()
        del want["source"]
        missing = [key for key in want if key not in stored]
        if missing:
            raise ValueError(f"activation cache {self.cache_dir!r} does not record {', '.join(missing)} (written "
                             "by an older dlmscope, it cannot show what it was harvested from); use another cache "
                             "dir or delete this one")
        differs = [f"{path}={_short(theirs)}, not {_short(ours)}"
                   for path, ours, theirs in differences(want, {key: stored[key] for key in want})]
        if index["d"] is not None and want["d"] is not None and index["d"] != want["d"] and stored["d"] == want["d"]:
            differs.append(f"d={index['d']!r} in its shards, not {want['d']!r}")
        if differs:
            raise ValueError(f"activation cache {self.cache_dir!r} was harvested with {'; '.join(differs)}; use "
                             "another cache dir or delete this one")
        cache_layers(index, self.layers, self.cache_dir)
        return True

    def _chunks(self, layers: list[int]) -> Iterator[dict[int, Tensor]]:
        self._passes += 1
        if self.check_cache():
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
        if not self.check_cache():
            for _ in write_cache(self.harvest_chunks(), self.cache_dir, shard_tokens=self.shard_tokens,
                                 meta=self.meta()):
                pass
        return CachedActivationStream(self.cache_dir, self.layers, self.batch_size, self.buffer_tokens, self.seed,
                                      drop_last=self.drop_last, device=self.device)
