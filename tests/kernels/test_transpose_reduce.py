"""The Triton transpose-reduce's split of heavy latents into pieces (dlmscope.kernels.transpose_reduce), and the
sorted layout shared with a caller, against the float64 reference."""
from __future__ import annotations

import importlib

import pytest
import torch

from dlmscope import reference

K = pytest.importorskip("dlmscope.kernels")
tr = importlib.import_module("dlmscope.kernels.transpose_reduce")  # the module (the package re-exports the function)

from tests.helpers.devices import TEST_DEVICE  # noqa: E402

DEV = torch.device(TEST_DEVICE)


def test_plan_pieces_splits_long_segments_and_bounds_the_grids():
    # latents 0..4 with 0, 3, 20, 8, 9 entries; pieces of at most 8
    counts = torch.tensor([0, 3, 20, 8, 9])
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    item_lat, first_item, pieces, slot, split_lat, slots = tr.plan_pieces(starts, int(counts.sum()), 8)
    assert pieces.tolist() == [1, 1, 3, 1, 2]
    assert item_lat.tolist()[:8] == [0, 1, 2, 2, 2, 3, 4, 4] and set(item_lat.tolist()[8:]) <= {5}
    assert first_item.tolist() == [0, 1, 2, 5, 6]
    assert [int(slot[2]), int(slot[4])] == [0, 3] and slots >= 5
    assert split_lat.tolist()[:2] == [2, 4] and set(split_lat.tolist()[2:]) <= {5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_latent_on_every_row_is_split_and_still_exact(dtype):
    B, k, n, d = 45, 3, 12, 19            # latent 5 has 45 entries: 6 pieces of 8 under the interpreter
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(n - 1, generator=g)[:k] + 1 for _ in range(B)])
    idx[:, 0] = 5
    idx[:, 1:] = torch.where(idx[:, 1:] == 5, 11, idx[:, 1:])
    idx[:, 2] = torch.where(idx[:, 2] == idx[:, 1], 0, idx[:, 2])
    coef = torch.randn(B, k, generator=g, dtype=torch.float64)
    X = torch.randn(B, d, generator=g, dtype=torch.float64)
    out, coef_sum = K.transpose_reduce(coef.to(DEV, dtype), idx.to(DEV), X.to(DEV, dtype), n)
    ref, ref_sum = reference.transpose_reduce(coef, idx, X, n)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol * B ** 0.5, rtol=tol)
    torch.testing.assert_close(coef_sum.double().cpu(), ref_sum, atol=tol * B ** 0.5, rtol=tol)
    again = K.transpose_reduce(coef.to(DEV, dtype), idx.to(DEV), X.to(DEV, dtype), n)
    assert torch.equal(out, again[0]) and torch.equal(coef_sum, again[1])   # pieces summed in a fixed order


def test_a_given_layout_is_used_as_is():
    B, k, n, d = 10, 2, 7, 5
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]).to(DEV)
    coef, X = torch.randn(B, k, generator=g).to(DEV), torch.randn(B, d, generator=g).to(DEV)
    layout = K.sort_by_latent(idx, n)
    assert all(torch.equal(a, b) for a, b in zip(K.transpose_reduce(coef, idx, X, n, layout=layout),
                                                 K.transpose_reduce(coef, idx, X, n)))


def test_a_training_backward_sorts_the_ids_once():
    """The decoder's backward (dW_dec) and the encoder's (dW_enc) reduce over the same ids: one sort."""
    from dlmscope import ops
    from dlmscope.backends import get_backend
    backend = get_backend("triton")
    calls = []
    compute = backend._sorts._compute
    backend._sorts._compute = lambda idx, n: calls.append(n) or compute(idx, n)
    try:
        g = torch.Generator().manual_seed(2)
        B, d, n, k = 12, 10, 30, 3
        x = torch.randn(B, d, generator=g).to(DEV)
        W_enc = torch.randn(n, d, generator=g).to(DEV).requires_grad_()
        W_dec = torch.randn(n, d, generator=g).to(DEV).requires_grad_()
        b_enc, b_dec = torch.zeros(n, device=DEV, requires_grad=True), torch.zeros(d, device=DEV, requires_grad=True)
        values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, k, backend="triton")
        x_hat = ops.sparse_decode(values, indices, W_dec, b_dec, backend="triton")
        (x - x_hat).pow(2).sum().backward()
    finally:
        backend._sorts._compute = compute
    assert calls == [n] and W_enc.grad is not None and W_dec.grad is not None
