"""Launch helpers shared by the Triton kernels: block sizes, dtype mapping, grids.

Configs are fixed (no autotuning, so the first call does not pay a sweep and nothing syncs with the host).
Two regimes: CUDA tensors get GPU-sized blocks; anything else runs under ``TRITON_INTERPRET=1`` where every
block operation is a NumPy call, so the blocks are tiny and the loops short.
"""
from __future__ import annotations

import functools
import os

import torch
import triton


def next_pow2(x: int) -> int:
    return int(triton.next_power_of_2(max(int(x), 1)))


def log2(x: int) -> int:
    """log2 of a power of two."""
    assert x > 0 and x & (x - 1) == 0, x
    return int(x).bit_length() - 1


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def interpreted(t: torch.Tensor) -> bool:
    """True when the kernel will run under the Triton interpreter (``TRITON_INTERPRET=1`` or non-CUDA)."""
    return t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def num_sms(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 4
    return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


def dot_upcast(t: torch.Tensor) -> bool:
    """Whether ``tl.dot`` operands must be cast to fp32 first.

    The Triton interpreter (3.6 and 3.9 alike) computes ``tl.dot`` of bfloat16 blocks on their raw bit
    patterns, so under the interpreter bf16 tiles are upcast (bf16 x bf16 products are exact in fp32, so the
    result equals a bf16 MMA with fp32 accumulation up to summation order).
    """
    return interpreted(t) and t.dtype == torch.bfloat16


def dot_precision(t: torch.Tensor) -> str:
    """``input_precision`` of ``tl.dot``: exact fp32 products unless ``DLMSCOPE_TF32=1``; inert for 16-bit."""
    if t.dtype == torch.float32:
        return "tf32" if os.environ.get("DLMSCOPE_TF32", "0") == "1" and not interpreted(t) else "ieee"
    if dot_upcast(t):
        return "ieee"
    return "tf32"


# ---- topk_encode --------------------------------------------------------------------------------------
class EncodeConfig:
    __slots__ = ("KP", "BLOCK_B", "BLOCK_N", "BLOCK_D", "GROUP_B", "splits", "n_per_split", "num_warps",
                 "num_stages", "INDEX_BITS", "ONE_RED")

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "EncodeConfig(" + ", ".join(f"{s}={getattr(self, s)}" for s in self.__slots__) + ")"


#: ``BLOCK_B,BLOCK_N,BLOCK_D,num_warps,num_stages`` for the fused encoder on CUDA (the GPU sweep sets it)
TILE_ENV = "DLMSCOPE_ENCODE_TILE"


def tile_override(KP: int) -> tuple[int, int, int, int, int] | None:
    """The encoder tile from ``$DLMSCOPE_ENCODE_TILE``, validated (powers of two, ``BLOCK_N >= KP``); None if
    unset."""
    text = os.environ.get(TILE_ENV, "").strip()
    if not text:
        return None
    try:
        tile = tuple(int(v) for v in text.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 5 or any(v < 1 for v in tile) or any(v & (v - 1) for v in tile[:4]) or min(tile[:3]) < 16:
        raise ValueError(f"{TILE_ENV} must be BLOCK_B,BLOCK_N,BLOCK_D,num_warps,num_stages with powers of two for "
                         f"the first four and BLOCK_B, BLOCK_N, BLOCK_D >= 16 (tl.dot's minimum), got {text!r}")
    if tile[1] < KP:
        raise ValueError(f"{TILE_ENV}: BLOCK_N={tile[1]} must be >= KP={KP} (the next power of two >= k)")
    return tile


#: mantissa bits of the fp32 pre-activation that a 32-bit key keeps, per 16-bit input dtype: one more than the
#: output dtype has (bf16 7, fp16 10), so a truncated value still rounds to within 1 ulp of the output dtype
KEY32_KEPT_BITS = {torch.bfloat16: 8, torch.float16: 11}
#: ``32`` / ``64`` forces the key width of the fused encoder (for A/B runs on a GPU); unset: 32 for 16-bit inputs
KEYS_ENV = "DLMSCOPE_ENCODE_KEYS"
#: 1: bitonic compare-and-swap with one reduction per step (partner = pair sum - self); 0: min + max reductions
ONE_RED_ENV = "DLMSCOPE_ENCODE_ONE_RED"


def key32_max_index_bits(dtype: torch.dtype) -> int:
    """Largest split-local index width of a 32-bit key for ``dtype`` inputs (0: the dtype uses int64 keys)."""
    width = os.environ.get(KEYS_ENV, "").strip()
    if width not in ("", "32", "64"):
        raise ValueError(f"{KEYS_ENV} must be 32 or 64, got {width!r}")
    if width == "64" or (dtype not in KEY32_KEPT_BITS and width != "32"):
        return 0
    return 23 - KEY32_KEPT_BITS.get(dtype, 8)


#: largest KP the fused encoder runs at; above it (where every tile compiled for sm_90 spills) ``topk_encode`` is
#: a GEMM over latent chunks + the threshold-then-compact select (kernels/topk_select.py)
FUSED_MAX_KP = {torch.bfloat16: 512, torch.float16: 512, torch.float32: 256}
#: latents per GEMM chunk of that route (B x chunk pre-activations live at a time)
SELECT_CHUNK = 16384


def fused_max_kp(dtype: torch.dtype) -> int:
    return FUSED_MAX_KP.get(dtype, 256)


def cuda_tile(KP: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """``(BLOCK_B, BLOCK_N, BLOCK_D, num_warps, num_stages)`` of the fused encoder on CUDA (before
    ``$DLMSCOPE_ENCODE_TILE``), ``KP <= fused_max_kp(dtype)``. Every one compiles for sm_90 with triton 3.6 without
    spills (benchmarks/sm90_encoder_compile.py -> benchmarks/results/sm90-encoder-compile.md compiles exactly
    these); 16-bit KP <= 128 keeps warp-group MMA. fp32 (int64 keys, FMA products) needs half the row block of bf16."""
    if dtype in KEY32_KEPT_BITS:
        if KP <= 128:
            return 64, 128, 32, 8, 3
        if KP <= 256:
            return 32, 256, 32, 8, 3
        return 16, KP, 16, 16, 1
    if KP <= 128:
        return 32, 128, 32, 8, 3
    return 16, KP, 32, 8, 2


def encode_config(x: torch.Tensor, n: int, k: int) -> EncodeConfig:
    """Tiles of the fused encoder: GEMM tile BLOCK_B x BLOCK_N (x BLOCK_D), running top-KP per row.

    ``KP`` = next power of two >= k (at least 2, so every network has a pair to compare). ``BLOCK_N >= KP`` because each tile's top-KP is merged into the running top-KP by one
    elementwise max + bitonic merge. The latent axis is cut into ``splits`` ranges (multiples of BLOCK_N)
    so that there are enough programs; programs are ordered in groups of GROUP_B row blocks x all splits so
    the x blocks and W tiles that run concurrently fit in L2.

    Keys: int32 for bf16 / fp16 (``INDEX_BITS`` = L = log2 of the split's latent range rounded up to a power of
    two; splits are made small enough that ``L <= key32_max_index_bits``), int64 otherwise (``INDEX_BITS`` 0) —
    also for 16-bit inputs where that bound would need more than max(2x the splits, 64) splits (n in the millions),
    unless ``DLMSCOPE_ENCODE_KEYS=32``.
    """
    B, d = x.shape
    cfg = EncodeConfig()
    KP = max(2, next_pow2(k))
    cfg.KP = KP
    if interpreted(x):
        cfg.BLOCK_B = 16
        cfg.BLOCK_N = max(16, KP)
        cfg.BLOCK_D = 16 if d <= 16 else 32
        cfg.GROUP_B = 2
        cfg.num_warps, cfg.num_stages = 4, 1
        target_programs = 1
    else:
        cfg.BLOCK_B, cfg.BLOCK_N, cfg.BLOCK_D, cfg.num_warps, cfg.num_stages = cuda_tile(KP, x.dtype)
        tile = tile_override(KP)
        if tile is not None:
            cfg.BLOCK_B, cfg.BLOCK_N, cfg.BLOCK_D, cfg.num_warps, cfg.num_stages = tile
        cfg.GROUP_B = 8
        target_programs = 2 * num_sms(x)
        if B <= 16:
            cfg.BLOCK_B = 16
        elif B <= 32:
            cfg.BLOCK_B = min(cfg.BLOCK_B, 32)
    n_tiles = cdiv(n, cfg.BLOCK_N)
    row_blocks = cdiv(B, cfg.BLOCK_B)
    if interpreted(x):
        splits = min(2, n_tiles)
    else:
        # enough splits that GROUP_B row blocks x splits fill the GPU, and enough programs overall
        splits = max(cdiv(num_sms(x), cfg.GROUP_B), cdiv(target_programs, row_blocks))
        splits = max(1, min(splits, n_tiles))
    tiles_per_split = cdiv(n_tiles, splits)
    max_bits = key32_max_index_bits(x.dtype)
    if max_bits and cfg.BLOCK_N > 1 << max_bits:
        max_bits = 0                                      # a tile wider than the index range: int64 keys
    forced32 = os.environ.get(KEYS_ENV, "").strip() == "32"
    if max_bits and not forced32 and cdiv(n_tiles, (1 << max_bits) // cfg.BLOCK_N) > max(2 * splits, 64):
        # bounding splits to the index range would multiply the [B, splits * KP] candidates (and their merge)
        # far beyond what filling the GPU needs (fp16 at n = 2^20: 256 splits): int64 keys then cost less
        max_bits = 0
    if max_bits:                                          # split-local indices must fit in max_bits
        tiles_per_split = min(tiles_per_split, (1 << max_bits) // cfg.BLOCK_N)
    cfg.n_per_split = tiles_per_split * cfg.BLOCK_N
    cfg.splits = cdiv(n, cfg.n_per_split)
    cfg.INDEX_BITS = max(1, log2(next_pow2(min(n, cfg.n_per_split)))) if max_bits else 0
    cfg.ONE_RED = os.environ.get(ONE_RED_ENV, "1") != "0"
    cfg.GROUP_B = max(1, min(cfg.GROUP_B, row_blocks))
    return cfg


# ---- topk_select ----------------------------------------------------------------------------------------
class SelectConfig:
    __slots__ = ("BLOCK_C", "num_warps")


def cuda_select_config(C: int) -> SelectConfig:
    """The select's CUDA config for rows of ``C`` columns: 4096 columns per step with 8 warps (16 values per
    thread in flight; compiled for sm_90 by benchmarks/sm90_encoder_compile.py)."""
    cfg = SelectConfig()
    cfg.BLOCK_C = min(4096, max(256, next_pow2(C)))
    cfg.num_warps = 8 if cfg.BLOCK_C >= 2048 else 4
    return cfg


def select_config(t: torch.Tensor, C: int) -> SelectConfig:
    """Row sweep of the threshold-then-compact select: :func:`cuda_select_config` on CUDA, 32 columns under the
    interpreter (so tests take several sweeps)."""
    if not interpreted(t):
        return cuda_select_config(C)
    cfg = SelectConfig()
    cfg.BLOCK_C, cfg.num_warps = min(32, next_pow2(C)), 1
    return cfg


# ---- sparse row kernels ---------------------------------------------------------------------------------
def row_block_d(t: torch.Tensor, d: int) -> int:
    """Width of the d-tile of the row-gather kernels."""
    if interpreted(t):
        return min(next_pow2(d), 64)
    return min(next_pow2(d), 512)


def k_block(t: torch.Tensor, k: int) -> int:
    if interpreted(t):
        return min(next_pow2(k), 16)
    return min(next_pow2(k), 32)


def entry_block(t: torch.Tensor) -> int:
    """How many (b, j) entries of one latent the transpose-reduce kernel takes per step."""
    return 8 if interpreted(t) else 16


def norm_block_d(t: torch.Tensor, d: int) -> int:
    """d-tile of the decoder-norm kernel: the whole row in one block up to 8192, else 2048-wide sweeps
    (sizes whose sm_90 builds need no spills)."""
    if interpreted(t):
        return min(next_pow2(d), 64) if d > 128 else next_pow2(d)
    return next_pow2(d) if d <= 8192 else 2048


def norm_warps(t: torch.Tensor, block_d: int) -> int:
    if interpreted(t):
        return 1
    return max(1, min(16, block_d // 512))


def warps_for(block_elems: int, interpreted_: bool) -> int:
    if interpreted_:
        return 1
    if block_elems >= 8192:
        return 8
    if block_elems >= 2048:
        return 4
    return 2
