"""Triton kernels, one primitive per module; no autograd and no validation (``dlmscope.ops`` validates).

Each function takes contiguous, already-validated tensors on one device (CUDA, or CPU under
``TRITON_INTERPRET=1``) and launches with fixed configs from :mod:`._launch` (no autotuning, no host sync).
"""
from .decoder_norm import decoder_norm_step
from .gather_accumulate import gather_accumulate
from .sddmm import sddmm
from .topk_encode import topk_candidates, topk_encode, unpack_candidates, unpack_keys
from .topk_select import chunked_topk, topk_select
from .transpose_reduce import sort_by_latent, transpose_reduce

__all__ = [
    "topk_encode",
    "topk_candidates",
    "unpack_keys",
    "unpack_candidates",
    "topk_select",
    "chunked_topk",
    "gather_accumulate",
    "sddmm",
    "transpose_reduce",
    "sort_by_latent",
    "decoder_norm_step",
]
