"""Public ops: validated, differentiable, backend-dispatched, torch.compile-able.

- ``topk_encode(x, W_enc, b_enc, b_dec, k) -> (values [..., k], indices [..., k] int64)``
- ``sparse_decode(values, indices, W_dec, b_dec) -> x_hat [..., d]``
- ``decoder_norm_step(W_dec, grad, exp_avg, exp_avg_sq, step, lr, betas, eps)`` (in place)

Each is a ``torch.library.custom_op`` (namespace ``dlmscope``) with a fake (meta) implementation and an
autograd formula whose backward is itself a custom op, so the ops pass ``torch.library.opcheck`` and trace
inside ``torch.compile(fullgraph=True)``. Leading dimensions of ``x`` / ``values`` are flattened to one batch
axis B and restored on the way out.

Validation happens here, once, for every backend (bad input raises ``TypeError`` / ``ValueError`` naming the
argument and the shapes). The value checks that need a device-to-host sync — NaN/Inf in the encoder's inputs and
weights (x, W_enc, b_enc, b_dec), in the decoder's values and b_dec and in the decoder update's grad; index range —
are on by default and can be switched off for hot loops with ``set_value_checks(False)`` or
``DLMSCOPE_VALUE_CHECKS=0``; they are skipped while ``torch.compile`` traces.

Without them, non-finite input is the caller's responsibility: a NaN pre-activation is selected first by ``torch``
and ``chunked`` (``torch.topk`` orders NaN first) but never by ``cpu`` and ``triton`` (so a NaN in x or b_dec gives
zero values there); an Inf is an ordinary extreme everywhere. An index out of [0, n) still raises (RuntimeError) on
``torch``, ``chunked`` and ``cpu``, whose kernels check each index they read; ``triton``'s kernels do not.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .backends import available_backends, get_backend, resolve_backend_name
from .backends.base import in_native_dtype

__all__ = [
    "topk_encode",
    "topk_encode_grouped",
    "GroupedCodes",
    "sparse_decode",
    "decoder_norm_step",
    "available_backends",
    "set_value_checks",
    "value_checks",
]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_value_checks = os.environ.get("DLMSCOPE_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled: bool) -> None:
    """Turn the host-syncing value checks (NaN/Inf in inputs and weights, index range) on or off globally."""
    global _value_checks
    _value_checks = bool(enabled)


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Context manager form of :func:`set_value_checks`."""
    global _value_checks
    previous, _value_checks = _value_checks, bool(enabled)
    try:
        yield
    finally:
        _value_checks = previous


def _checking_values() -> bool:
    return _value_checks and not torch.compiler.is_compiling()


# ---- validation ---------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _require_float(name: str, t: Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _require_same(names_and_tensors: Sequence[tuple[str, Tensor]], reference_name: str, reference: Tensor) -> None:
    for name, t in names_and_tensors:
        if t.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}; "
                            "cast them to one dtype")
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def _require_ndim(name: str, t: Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {what}, got shape {_shape(t)}")


def _require_k(k, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= int(k) <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n (number of latents = {n}), got k={int(k)}")


def _require_finite(*named: tuple[str, Tensor]) -> None:
    """ValueError naming the first of the (name, tensor) pairs that holds NaN or Inf, while value checks run. One
    host sync for all: each tensor's min and max (NaN propagates into both), no temporary the size of a weight."""
    if not _checking_values():
        return
    present = [(name, t) for name, t in named if t.numel()]
    if not present:
        return
    if bool(torch.stack([torch.isfinite(torch.stack(torch.aminmax(t))).all() for _, t in present]).all()):
        return
    for name, t in present:
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = (~finite).nonzero()[0].tolist()
            raise ValueError(f"{name} {_shape(t)} contains NaN or Inf (first at index {tuple(bad)})")


def _flatten_batch(name: str, t: Tensor, width_name: str) -> tuple[Tensor, tuple[int, ...]]:
    """t [..., w] as [B, w] (B = the product of the leading dimensions; w may be 0) and the leading shape."""
    if t.dim() < 1:
        raise ValueError(f"{name} must have shape [..., {width_name}], got a scalar")
    lead = tuple(t.shape[:-1])
    flat = t.reshape(math.prod(lead), t.shape[-1]) if t.dim() != 2 else t
    if flat.shape[0] == 0:
        raise ValueError(f"{name} {_shape(t)} is an empty batch")
    return flat, lead


def _validate_encode(x, W_enc, b_enc, b_dec, k):
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec)):
        _require_tensor(name, t)
        _require_float(name, t)
    _require_ndim("W_enc", W_enc, 2, "[n, d]")
    n, d = W_enc.shape
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"x has shape {_shape(x)} but W_enc {_shape(W_enc)} expects last dimension d={d}")
    if b_enc.shape != (n,):
        raise ValueError(f"b_enc must have shape [n] = [{n}] to match W_enc {_shape(W_enc)}, got {_shape(b_enc)}")
    if b_dec.shape != (d,):
        raise ValueError(f"b_dec must have shape [d] = [{d}] to match W_enc {_shape(W_enc)}, got {_shape(b_dec)}")
    _require_same((("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec)), "x", x)
    _require_k(k, n)
    x2, lead = _flatten_batch("x", x, "d")
    # a NaN pre-activation is selected first by torch.topk but never by the fused kernels (see the module docstring)
    _require_finite(("x", x2), ("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec))
    return x2, lead


def _validate_decode(values, indices, W_dec, b_dec):
    for name, t in (("values", values), ("indices", indices), ("W_dec", W_dec), ("b_dec", b_dec)):
        _require_tensor(name, t)
    for name, t in (("values", values), ("W_dec", W_dec), ("b_dec", b_dec)):
        _require_float(name, t)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    _require_ndim("W_dec", W_dec, 2, "[n, d]")
    n, d = W_dec.shape
    if values.shape != indices.shape:
        raise ValueError(f"values {_shape(values)} and indices {_shape(indices)} must have the same shape")
    if b_dec.shape != (d,):
        raise ValueError(f"b_dec must have shape [d] = [{d}] to match W_dec {_shape(W_dec)}, got {_shape(b_dec)}")
    _require_same((("W_dec", W_dec), ("b_dec", b_dec)), "values", values)
    if indices.device != values.device:
        raise ValueError(f"indices is on {indices.device} but values is on {values.device}")
    v2, lead = _flatten_batch("values", values, "k")
    i2 = indices.reshape(v2.shape).long()
    if _checking_values() and i2.numel():
        lo, hi = int(i2.min()), int(i2.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"indices must lie in [0, n) = [0, {n}) for W_dec {_shape(W_dec)}, "
                             f"got values in [{lo}, {hi}]")
    # W_dec is not scanned: reading all n rows would cost far more than the decode reads (B·k rows); a NaN in a
    # selected row propagates alike on every backend
    _require_finite(("values", v2), ("b_dec", b_dec))
    return v2, i2, lead


def _require_ints(name: str, seq) -> list[int]:
    """``seq`` as a list of ints; ValueError naming ``name`` for anything but integers (2.0 and True included)."""
    items = list(seq) if hasattr(seq, "__iter__") and not isinstance(seq, (str, bytes)) else None
    if items is None or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items):
        raise ValueError(f"{name} must be a sequence of ints, got {seq!r}")
    return [int(i) for i in items]


def _validate_grouped(x, W_enc, b_enc, b_dec, ks, sizes, aux_mask, k_aux):
    """Checks of :func:`topk_encode_grouped`; returns (x2 [B, d], ks, sizes, aux_mask contiguous or None, k_aux)."""
    x2, _ = _validate_encode(x, W_enc, b_enc, b_dec, 1)
    if x.dim() != 2:
        raise ValueError(f"x must be [B, d] for the grouped encoder, got shape {_shape(x)}")
    ks, sizes = _require_ints("ks", ks), _require_ints("sizes", sizes)
    if not ks or len(ks) != len(sizes):
        raise ValueError(f"ks and sizes must be non-empty and of equal length, got {len(ks)} and {len(sizes)}")
    if sum(sizes) != W_enc.shape[0]:
        raise ValueError(f"sizes sum to {sum(sizes)} but W_enc {_shape(W_enc)} has {W_enc.shape[0]} latents")
    for g, (k, size) in enumerate(zip(ks, sizes)):
        if not 1 <= k <= size:
            raise ValueError(f"segment {g}: k must satisfy 1 <= k <= size ({size}), got k={k}")
    if aux_mask is None:
        return x2, ks, sizes, None, [0] * len(ks)
    _require_tensor("aux_mask", aux_mask)
    if aux_mask.dtype != torch.bool or aux_mask.shape != (W_enc.shape[0],):
        raise ValueError(f"aux_mask must be a bool tensor of shape [{W_enc.shape[0]}], got {aux_mask.dtype} "
                         f"{_shape(aux_mask)}")
    if aux_mask.device != x.device:
        raise ValueError(f"aux_mask is on {aux_mask.device} but x is on {x.device}")
    k_aux = _require_ints("k_aux", k_aux if k_aux is not None else [])
    if len(k_aux) != len(ks) or any(not 0 <= ka <= size for ka, size in zip(k_aux, sizes)):
        raise ValueError(f"k_aux must give one value in [0, size] per segment, got {k_aux} for sizes {sizes}")
    return x2, ks, sizes, aux_mask.contiguous(), k_aux


def _require_real(name: str, value) -> float:
    """``value`` as a float; TypeError naming ``name`` unless it is a real number (not a bool) or a one-element
    tensor."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _require_disjoint(named: Sequence[tuple[str, Tensor]]) -> None:
    """ValueError naming two of the (name, tensor) pairs whose memory overlaps: an op that updates one of them in
    place would change the other mid-update. Compares storages and element spans (no data is read)."""
    if torch.compiler.is_compiling():  # fake tensors have no memory; functionalisation sees the aliases
        return
    spans = []
    for name, t in named:
        if t.numel() == 0 or t.device.type == "meta":
            continue
        first = t.storage_offset() * t.element_size()
        last = first + (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()
        spans.append((name, t.untyped_storage().data_ptr(), first, last))
    for i, (name_a, base_a, first_a, last_a) in enumerate(spans):
        for name_b, base_b, first_b, last_b in spans[i + 1:]:
            if base_a == base_b and first_a < last_b and first_b < last_a:
                raise ValueError(f"{name_a} and {name_b} share memory; decoder_norm_step needs separate tensors "
                                 "(W_dec, exp_avg and exp_avg_sq are updated in place)")


def _validate_decoder_step(W_dec, grad, exp_avg, exp_avg_sq, step, lr, betas, eps):
    """Checks of :func:`decoder_norm_step`; returns (lr, (beta1, beta2), eps) as floats."""
    tensors = (("W_dec", W_dec), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))
    for name, t in tensors:
        _require_tensor(name, t)
        _require_float(name, t)
        _require_ndim(name, t, 2, "[n, d]")
        if t.shape != W_dec.shape:
            raise ValueError(f"{name} has shape {_shape(t)} but W_dec has {_shape(W_dec)}")
    _require_same(tensors[1:], "W_dec", W_dec)
    for name, t in (("W_dec", W_dec), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is updated in place")
    _require_disjoint(tensors)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 1 <= step < 2**63:  # the op's int64
        raise ValueError(f"step must be an int >= 1 (Adam counts steps from 1) and < 2**63, got {step!r}")
    pair = list(betas) if isinstance(betas, (tuple, list)) else []
    if len(pair) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (_require_real("betas", b) for b in pair)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {(beta1, beta2)}")
    lr, eps = _require_real("lr", lr), _require_real("eps", eps)
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"lr must be >= 0 and finite, got {lr}")
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be > 0 and finite, got {eps}")
    _require_finite(("grad", grad))
    return lr, (beta1, beta2), eps


# ---- custom ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("dlmscope::topk_encode", mutates_args=())
def _topk_encode_op(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int,
                    backend: str) -> tuple[Tensor, Tensor]:
    values, indices = in_native_dtype(get_backend(backend).encode, x, W_enc, b_enc, b_dec, k)
    return values, indices.long()


@_topk_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, k, backend):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("dlmscope::topk_encode_backward", mutates_args=())
def _topk_encode_backward_op(d_values: Tensor, values: Tensor, indices: Tensor, x: Tensor, W_enc: Tensor,
                             b_dec: Tensor, need_dx: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return in_native_dtype(get_backend(backend).encode_backward, d_values.contiguous(), values, indices, x, W_enc,
                            b_dec, need_dx)


@_topk_encode_backward_op.register_fake
def _(d_values, values, indices, x, W_enc, b_dec, need_dx, backend):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[0]), torch.empty_like(b_dec)


def _topk_encode_setup(ctx, inputs, output):
    x, W_enc, _b_enc, b_dec, _k, backend = inputs
    values, indices = output
    ctx.save_for_backward(x, W_enc, b_dec, values, indices)
    ctx.backend = backend
    ctx.mark_non_differentiable(indices)


def _topk_encode_backward(ctx, d_values, _d_indices):
    x, W_enc, b_dec, values, indices = ctx.saved_tensors
    need_dx = bool(ctx.needs_input_grad[0])
    dx, dW_enc, db_enc, db_dec = _topk_encode_backward_op(d_values, values, indices, x, W_enc, b_dec, need_dx,
                                                          ctx.backend)
    return dx if need_dx else None, dW_enc, db_enc, db_dec, None, None


_topk_encode_op.register_autograd(_topk_encode_backward, setup_context=_topk_encode_setup)


@torch.library.custom_op("dlmscope::topk_encode_grouped", mutates_args=())
def _topk_encode_grouped_op(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, ks: list[int], sizes: list[int],
                            aux_mask: Optional[Tensor], k_aux: list[int],
                            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    values, indices, aux_values, aux_indices = in_native_dtype(get_backend(backend).encode_grouped, x, W_enc, b_enc,
                                                                b_dec, list(ks), list(sizes), aux_mask, list(k_aux))
    return values, indices.long(), aux_values, aux_indices.long()


@_topk_encode_grouped_op.register_fake
def _(x, W_enc, b_enc, b_dec, ks, sizes, aux_mask, k_aux, backend):
    B, k_main = x.shape[0], sum(ks)
    k_side = sum(k_aux) if aux_mask is not None else 0
    return (x.new_empty(B, k_main), x.new_empty(B, k_main, dtype=torch.int64), x.new_empty(B, k_side),
            x.new_empty(B, k_side, dtype=torch.int64))


def _topk_encode_grouped_setup(ctx, inputs, output):
    x, W_enc, _b_enc, b_dec, _ks, _sizes, _aux_mask, _k_aux, backend = inputs
    values, indices, aux_values, aux_indices = output
    ctx.save_for_backward(x, W_enc, b_dec, values, indices, aux_values, aux_indices)
    ctx.backend = backend
    ctx.mark_non_differentiable(indices, aux_indices)


def _topk_encode_grouped_backward(ctx, d_values, _d_indices, d_aux_values, _d_aux_indices):
    x, W_enc, b_dec, values, indices, aux_values, aux_indices = ctx.saved_tensors
    need_dx = bool(ctx.needs_input_grad[0])
    if aux_indices.shape[1]:
        d_values, values = torch.cat([d_values, d_aux_values], 1), torch.cat([values, aux_values], 1)
        indices = torch.cat([indices, aux_indices], 1)
    # without AuxK the ids stay the forward's tensor: the decoder's backward may already have sorted them
    dx, dW_enc, db_enc, db_dec = _topk_encode_backward_op(d_values, values, indices, x, W_enc, b_dec, need_dx,
                                                          ctx.backend)
    return dx if need_dx else None, dW_enc, db_enc, db_dec, None, None, None, None, None


_topk_encode_grouped_op.register_autograd(_topk_encode_grouped_backward, setup_context=_topk_encode_grouped_setup)


@torch.library.custom_op("dlmscope::sparse_decode", mutates_args=())
def _sparse_decode_op(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, backend: str) -> Tensor:
    return in_native_dtype(get_backend(backend).decode, values, indices, W_dec, b_dec)


@_sparse_decode_op.register_fake
def _(values, indices, W_dec, b_dec, backend):
    return values.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("dlmscope::sparse_decode_backward", mutates_args=())
def _sparse_decode_backward_op(g: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return in_native_dtype(get_backend(backend).decode_backward, g.contiguous(), values, indices, W_dec)


@_sparse_decode_backward_op.register_fake
def _(g, values, indices, W_dec, backend):
    return torch.empty_like(values), torch.empty_like(W_dec), g.new_empty(g.shape[1])


def _sparse_decode_setup(ctx, inputs, output):
    values, indices, W_dec, _b_dec, backend = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.backend = backend


def _sparse_decode_backward(ctx, g):
    values, indices, W_dec = ctx.saved_tensors
    d_values, dW_dec, db_dec = _sparse_decode_backward_op(g, values, indices, W_dec, ctx.backend)
    return d_values, None, dW_dec, db_dec, None


_sparse_decode_op.register_autograd(_sparse_decode_backward, setup_context=_sparse_decode_setup)


@torch.library.custom_op("dlmscope::decoder_norm_step", mutates_args=("W_dec", "exp_avg", "exp_avg_sq"))
def _decoder_norm_step_op(W_dec: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                          beta1: float, beta2: float, eps: float, backend: str) -> None:
    impl = get_backend(backend)
    if W_dec.dtype in impl.native_dtypes:
        impl.decoder_norm_step(W_dec, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
        return
    work = [t.float() for t in (W_dec, exp_avg, exp_avg_sq)]
    impl.decoder_norm_step(work[0], grad.float(), work[1], work[2], step, lr, beta1, beta2, eps)
    for target, result in zip((W_dec, exp_avg, exp_avg_sq), work):
        target.copy_(result)


@_decoder_norm_step_op.register_fake
def _(W_dec, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, backend):
    return None


# ---- public API ---------------------------------------------------------------------------------------


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, *,
                backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Top-K SAE encoder: the k largest of ``relu((x - b_dec) @ W_enc.T + b_enc)`` per row.

    x [..., d], W_enc [n, d], b_enc [n], b_dec [d] (one float dtype, one device), 1 <= k <= n.
    Returns values [..., k] (x's dtype) and indices [..., k] int64, distinct within a row, order unspecified.
    Differentiable in x, W_enc, b_enc, b_dec; only the selected pre-activations carry gradient.
    """
    x2, lead = _validate_encode(x, W_enc, b_enc, b_dec, k)
    values, indices = _topk_encode_op(x2.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_dec.contiguous(),
                                      int(k), resolve_backend_name(backend, x2.device))
    return values.reshape(*lead, int(k)), indices.reshape(*lead, int(k))


class GroupedCodes(NamedTuple):
    """Result of :func:`topk_encode_grouped`; indices are global rows of the stacked W_enc."""

    values: Tensor
    indices: Tensor
    aux_values: Tensor
    aux_indices: Tensor


def topk_encode_grouped(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, ks: Sequence[int],
                        sizes: Sequence[int], *, aux_mask: Tensor | None = None,
                        k_aux: Sequence[int] | None = None, backend: str | None = None) -> GroupedCodes:
    """Several Top-K encoders sharing one input, as one op (one GEMM where the backend fuses it).

    W_enc [S, d] stacks segments of ``sizes`` latents (S = sum(sizes)); b_enc [S]; b_dec [d] is shared (fold a
    per-segment b_dec into b_enc as ``b_enc_g - W_enc_g @ b_dec_g``). Segment g keeps its ``ks[g]`` largest
    relu'd pre-activations. With ``aux_mask`` [S] bool, each segment also keeps its ``k_aux[g]`` largest among
    latents where the mask is True (the AuxK selection over dead latents; padded with zeros if fewer).
    x [B, d] (2-D). Returns GroupedCodes(values [B, sum(ks)], indices [B, sum(ks)] int64 global,
    aux_values [B, sum(k_aux)], aux_indices), blocks in segment order; all values are differentiable.
    """
    x2, ks, sizes, aux_mask, k_aux = _validate_grouped(x, W_enc, b_enc, b_dec, ks, sizes, aux_mask, k_aux)
    return GroupedCodes(*_topk_encode_grouped_op(x2.contiguous(), W_enc.contiguous(), b_enc.contiguous(),
                                                 b_dec.contiguous(), ks, sizes, aux_mask, k_aux,
                                                 resolve_backend_name(backend, x2.device)))


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, *,
                  backend: str | None = None) -> Tensor:
    """Top-K SAE decoder: ``x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]]``.

    values [..., k] float, indices [..., k] int64/int32 in [0, n), W_dec [n, d], b_dec [d]. Returns [..., d].
    Duplicate indices within a row add up. Differentiable in values, W_dec, b_dec.
    """
    v2, i2, lead = _validate_decode(values, indices, W_dec, b_dec)
    x_hat = _sparse_decode_op(v2.contiguous(), i2.contiguous(), W_dec.contiguous(), b_dec.contiguous(),
                              resolve_backend_name(backend, v2.device))
    return x_hat.reshape(*lead, W_dec.shape[1])


def decoder_norm_step(W_dec: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *,
                      backend: str | None = None) -> None:
    """Fused decoder update, in place on W_dec, exp_avg, exp_avg_sq (all [n, d], contiguous, one dtype):

    remove from each gradient row its component along the (unit) decoder row, take one Adam step exactly as
    ``torch.optim.Adam`` would (``step`` counts from 1), renormalise every decoder row to unit norm. A zero row
    takes its gradient unprojected and stays exactly zero while its update is zero (never NaN; see
    ``reference.decoder_norm_step``). ``grad`` is read only.
    """
    lr, (beta1, beta2), eps = _validate_decoder_step(W_dec, grad, exp_avg, exp_avg_sq, step, lr, betas, eps)
    name = resolve_backend_name(backend, W_dec.device)
    with torch.no_grad():
        _decoder_norm_step_op(W_dec, grad.contiguous(), exp_avg, exp_avg_sq, int(step), lr, beta1, beta2, eps,
                              name)
