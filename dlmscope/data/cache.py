"""The on-disk activation cache: harvest once, train many SAEs (any layer, any number of passes) without the model.

Layout of ``cache_dir``: ``shard_00000.safetensors`` … with one tensor ``layer_{L}`` ``[n_i, d]`` per layer,
each written atomically (tmp file + rename), and ``index.json`` (written last, atomically) listing the shards,
their token counts, the layers, ``d``, the dtype and what the harvest read and how (``meta``: the model's
identity, the text, the policy, ...; :class:`~dlmscope.data.activations.ActivationStream` refuses a cache whose
``meta`` is not its own). A directory without ``index.json`` is an incomplete cache. :class:`CachedActivationStream`
streams a complete cache through the same shuffle buffer as a live harvest, so it yields the same batches.

Reading trusts nothing on disk: :func:`load_cache_index` checks the index and every shard's header against it
(shard names must be plain file names in the folder), so a damaged or hostile cache raises a ValueError naming
the file before any tensor is read.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from dlmscope.util import atomic
from .shuffle import SizedLayerStream, check_batching, chunk_len, shuffle_batches, slice_chunk

__all__ = ["CACHE_VERSION", "INDEX_FILE", "INDEX_KEYS", "SAFETENSORS_DTYPES", "write_cache", "read_cache",
           "load_cache_index", "check_index", "check_shard", "dtype_name", "cache_layers", "CachedActivationStream"]

CACHE_VERSION = 1
INDEX_FILE = "index.json"
#: the keys of ``index.json``
INDEX_KEYS = ("version", "layers", "d", "dtype", "total_tokens", "shards", "meta")
#: the activation dtypes a cache holds (as ``index.json`` names them) -> safetensors' name for each
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


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
            if dtype_name(dtype) not in SAFETENSORS_DTYPES:
                raise ValueError(f"an activation cache holds {sorted(SAFETENSORS_DTYPES)} activations, not {dtype}")
        m = chunk_len(chunk)
        pos = 0
        while pos < m:
            take = min(m - pos, shard_tokens - n_pending)
            pending.append(slice_chunk(chunk, pos, pos + take))
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
        "dtype": dtype_name(dtype) if dtype is not None else None,
        "total_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "meta": dict(meta or {}),
    }
    atomic.write_json(index_path, index)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, as ``index.json`` names dtypes."""
    return str(dtype).removeprefix("torch.")


def load_cache_index(cache_dir: str | os.PathLike) -> dict:
    """The checked ``index.json`` of a complete cache (FileNotFoundError if absent: missing or incomplete cache).

    Every shard's header is read too (no tensor data): a malformed index, a shard name that is not a plain file
    name in the folder, a shard missing, truncated or of another shape or dtype, or a ``total_tokens`` that is not
    the sum of the shards' rows raise a ValueError naming the file (``total_tokens`` sets a stream's length and so
    a trainer's LR schedule: it is never taken on trust)."""
    cache_dir = os.fspath(cache_dir)
    path = os.path.join(cache_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{cache_dir!r} holds no complete activation cache (no {INDEX_FILE})")
    index = atomic.read_json(path, "not a readable activation-cache index")
    check_index(index, path)
    for shard in index["shards"]:
        check_shard(os.path.join(cache_dir, shard["file"]), shard["tokens"], index)
    return index


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def check_index(index, path: str) -> None:
    """ValueError naming ``path`` unless ``index`` has the layout :func:`write_cache` writes."""
    if not isinstance(index, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(index).__name__}")
    missing = [key for key in INDEX_KEYS if key not in index]
    if missing:
        raise ValueError(f"{path}: activation-cache index lacks {missing}")
    if index["version"] != CACHE_VERSION or isinstance(index["version"], bool):
        raise ValueError(f"{path}: unsupported cache version {index['version']!r}")
    layers, shards = index["layers"], index["shards"]
    if not isinstance(layers, list) or not all(_is_int(x) for x in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"{path}: layers must be a list of distinct non-negative ints, got {layers!r}")
    if not isinstance(shards, list):
        raise ValueError(f"{path}: shards must be a list, got {type(shards).__name__}")
    if shards and not layers:
        raise ValueError(f"{path}: shards but no layers")
    if not isinstance(index["meta"], dict):
        raise ValueError(f"{path}: meta must be an object, got {type(index['meta']).__name__}")
    # an empty harvest writes no shard and knows no d or dtype
    empty = not layers and not shards
    if not (empty and index["d"] is None) and not _is_int(index["d"], 1):
        raise ValueError(f"{path}: d must be a positive int, got {index['d']!r}")
    if not (empty and index["dtype"] is None) and not (isinstance(index["dtype"], str)
                                                       and index["dtype"] in SAFETENSORS_DTYPES):
        raise ValueError(f"{path}: dtype must be one of {sorted(SAFETENSORS_DTYPES)}, got {index['dtype']!r}")
    names = set()
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or not _is_int(shard.get("tokens")):
            raise ValueError(f"{path}: shard {i} must be an object with a 'file' name and an int 'tokens' >= 0, "
                             f"got {shard!r}")
        name = shard["file"]
        # a plain name: an index never reads outside its own folder
        if name in ("", ".", "..") or "/" in name or "\\" in name or os.path.isabs(name):
            raise ValueError(f"{path}: shard {i}'s file {name!r} is not a plain file name inside the cache folder")
        if name in names:
            raise ValueError(f"{path}: shard file {name!r} is listed twice")
        names.add(name)
    total = sum(shard["tokens"] for shard in shards)
    if not _is_int(index["total_tokens"]) or index["total_tokens"] != total:
        raise ValueError(f"{path}: total_tokens={index['total_tokens']!r} but its shards hold {total} rows")


def check_shard(path: str, tokens: int, index: dict) -> None:
    """ValueError naming the shard at ``path`` unless its header holds ``[tokens, d]`` tensors of the index's dtype
    for every layer of the index (only the header is read)."""
    want = [tokens, index["d"]]
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for layer in index["layers"]:
                key = f"layer_{layer}"
                if key not in f.keys():
                    raise ValueError(f"{path}: activation-cache shard has no tensor {key!r}")
                view = f.get_slice(key)
                shape, dtype = list(view.get_shape()), view.get_dtype()
                if shape != want or dtype != SAFETENSORS_DTYPES[index["dtype"]]:
                    raise ValueError(f"{path}: {key} is {dtype} {shape}, the index says "
                                     f"{SAFETENSORS_DTYPES[index['dtype']]} {want}")
    except FileNotFoundError:
        raise ValueError(f"{path}: activation-cache shard listed in {INDEX_FILE} is missing") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable activation-cache shard ({type(e).__name__}: {e})") from None


def cache_layers(index: dict, layers, source: str) -> list[int]:
    """The requested ``layers`` (all of the cache's when None), sorted; ValueError naming any the cache lacks."""
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
    cache_dir = os.fspath(cache_dir)
    index = load_cache_index(cache_dir)
    layers = cache_layers(index, layers, cache_dir)
    for shard in index["shards"]:
        path = os.path.join(cache_dir, shard["file"])
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                chunk = {k: f.get_tensor(f"layer_{k}") for k in layers}
        except FileNotFoundError:
            raise ValueError(f"{path}: activation-cache shard listed in {INDEX_FILE} is missing") from None
        except (SafetensorError, OSError) as e:  # changed on disk since the index was checked
            raise ValueError(f"{path}: unreadable activation-cache shard ({type(e).__name__}: {e})") from None
        if device is not None:
            chunk = {k: v.to(device) for k, v in chunk.items()}
        yield chunk


class CachedActivationStream:
    """Shuffled batches read from a complete activation cache; has ``len()`` (the number of batches).

    Same seed and batch settings as the live :class:`~dlmscope.data.activations.ActivationStream` that wrote the
    cache → the same batches.
    """

    def __init__(self, cache_dir, layers=None, batch_size: int = 2048, buffer_tokens: int = 262_144,
                 seed: int = 0, *, drop_last: bool = True, device=None):
        self.cache_dir = os.fspath(cache_dir)
        self.index = load_cache_index(self.cache_dir)
        self.layers = cache_layers(self.index, layers, self.cache_dir)
        check_batching(batch_size, buffer_tokens)
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
        # seed + 1: the same shuffle stream as the live ActivationStream with this seed
        return shuffle_batches(read_cache(self.cache_dir, layers, device=self.device), self.batch_size,
                               self.buffer_tokens, seed=self.seed + 1, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[dict[int, Tensor]]:
        return self._iter_layers(list(self.layers))

    def for_layer(self, layer: int) -> SizedLayerStream:
        if layer not in self.layers:
            raise ValueError(f"layer {layer!r} is not in this cache's stream (layers {self.layers})")
        return SizedLayerStream(self, layer)
