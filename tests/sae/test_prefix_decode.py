"""Matryoshka prefix reconstructions from one decode (dlmscope/sae/prefix_decode.py) against the dense oracle
``reference.matryoshka_reconstructions`` / ``matryoshka_loss``: values, losses and gradients on every backend here,
the edge layouts (empty segments, one segment holding everything, no entries), the one-decode work bound, bad input."""
from __future__ import annotations

import pytest
import torch

from dlmscope import ops, reference
from dlmscope.sae import prefix_decode
from dlmscope.sae.prefix_decode import prefix_losses, prefix_reconstructions

from tests.helpers.devices import native_float64, tolerance


def make_code(B, c, n, d, *, seed=0, dtype=torch.float64, lo=0, hi=None, zero_frac=0.0):
    """A sparse code (values [B, c] >= 0, indices [B, c] distinct per row in [lo, hi)), W_dec [n, d], b_dec [d]."""
    g = torch.Generator().manual_seed(seed)
    hi = n if hi is None else hi
    indices = torch.stack([lo + torch.randperm(hi - lo, generator=g)[:c] for _ in range(B)]) if B else \
        torch.zeros(0, c, dtype=torch.int64)
    values = torch.rand(B, c, generator=g, dtype=torch.float64) + 0.1
    values = values * (torch.rand(B, c, generator=g, dtype=torch.float64) >= zero_frac)
    W_dec = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b_dec = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    return values.to(dtype), indices, W_dec.to(dtype), b_dec.to(dtype)


def to(device, *ts):
    return [t.to(device) for t in ts]


def oracle(values, indices, W_dec, b_dec, prefixes):
    """The reference's [P, B, d] in float64 (leading dims of values flattened)."""
    v = values.reshape(-1, values.shape[-1]).double().cpu()
    i = indices.reshape(-1, indices.shape[-1]).long().cpu()
    return reference.matryoshka_reconstructions(v, i, W_dec.double().cpu(), b_dec.double().cpu(), prefixes)


def assert_matches(out, ref, dtype, backend):
    tol = tolerance(dtype, backend)
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(out.double().cpu().reshape(ref.shape), ref, rtol=tol, atol=tol * scale)


# ---- values ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, c, n, d, prefixes", [
    (9, 6, 40, 8, [4, 10, 25, 40]),
    (5, 12, 64, 13, [8, 64]),  # odd d
    (1, 3, 7, 5, [1, 2, 3, 4, 5, 6, 7]),  # a prefix per latent, P > c
    (33, 16, 100, 17, [16, 32, 64, 100]),
    (4, 1, 10, 3, [5, 10]),
])
def test_matches_the_oracle(backend, device, B, c, n, d, prefixes):
    for seed in range(3):
        values, indices, W_dec, b_dec = make_code(B, c, n, d, seed=seed, zero_frac=0.2)
        out = prefix_reconstructions(*to(device, values, indices, W_dec, b_dec), prefixes, backend=backend)
        assert out.shape == (len(prefixes), B, d) and out.dtype == torch.float64 and out.device.type == device.type
        assert_matches(out, oracle(values, indices, W_dec, b_dec, prefixes), torch.float64, backend)


def test_one_prefix_is_the_plain_decode(backend, device):
    values, indices, W_dec, b_dec = to(device, *make_code(11, 8, 30, 7, seed=1))
    out = prefix_reconstructions(values, indices, W_dec, b_dec, [30], backend=backend)
    assert out.shape == (1, 11, 7)
    # float64 to 1e-12 where the backend has it natively; triton computes both in float32 (its summation order
    # may differ between the two): float32 level
    tol = 1e-12 if native_float64(backend) else tolerance(torch.float64, backend)
    torch.testing.assert_close(out[0], ops.sparse_decode(values, indices, W_dec, b_dec, backend=backend),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("lo, hi", [(0, 5), (35, 40), (12, 20)])
def test_all_entries_in_one_segment(backend, device, lo, hi):
    """The worst case of a pad-to-the-largest-group layout: every row's entries in one segment; the other prefixes'
    reconstructions are b_dec (below the segment) or the full decode (above it)."""
    prefixes = [5, 12, 20, 40]
    values, indices, W_dec, b_dec = make_code(6, 5, 40, 9, seed=2, lo=lo, hi=hi)
    out = prefix_reconstructions(*to(device, values, indices, W_dec, b_dec), prefixes, backend=backend)
    assert_matches(out, oracle(values, indices, W_dec, b_dec, prefixes), torch.float64, backend)
    first = prefixes.index(hi)
    for p in range(first):
        torch.testing.assert_close(out[p].cpu(), b_dec.expand(6, 9), rtol=0, atol=0)
    for p in range(first + 1, len(prefixes)):
        torch.testing.assert_close(out[p], out[first], rtol=0, atol=0)


def test_segments_empty_for_some_rows(backend, device):
    """Row 0 has nothing below 10, row 1 nothing in [10, 30), row 2 everything in the last segment, row 3 all zero
    values; the others are random."""
    prefixes = [10, 30, 50]
    values, indices, W_dec, b_dec = make_code(8, 6, 50, 6, seed=3)
    g = torch.Generator().manual_seed(4)
    indices[0] = 10 + torch.randperm(40, generator=g)[:6]
    indices[1] = torch.cat([torch.randperm(10, generator=g)[:3], 30 + torch.randperm(20, generator=g)[:3]])
    indices[2] = 30 + torch.randperm(20, generator=g)[:6]
    values[3] = 0
    out = prefix_reconstructions(*to(device, values, indices, W_dec, b_dec), prefixes, backend=backend)
    assert_matches(out, oracle(values, indices, W_dec, b_dec, prefixes), torch.float64, backend)
    torch.testing.assert_close(out[:, 3].cpu(), b_dec.expand(3, 6), rtol=0, atol=0)


def test_duplicate_indices_add_up_like_the_decode():
    values, indices, W_dec, b_dec = make_code(4, 6, 20, 5, seed=5)
    indices[:, 3:] = indices[:, :3]
    out = prefix_reconstructions(values, indices, W_dec, b_dec, [7, 20], backend="torch")
    assert_matches(out, oracle(values, indices, W_dec, b_dec, [7, 20]), torch.float64, "torch")


@pytest.mark.parametrize("lead", [(), (2, 3), (2, 1, 4)])
def test_leading_dims_and_non_contiguous_inputs(backend, device, lead):
    B = 1
    for s in lead:
        B *= s
    values, indices, W_dec, b_dec = make_code(B, 7, 24, 11, seed=6, zero_frac=0.3)
    # values/indices as transposed views, W_dec as a transposed view, b_dec strided, indices int32
    v = values.reshape(*lead, 7).to(device).transpose(-1, 0).contiguous().transpose(-1, 0)
    i = indices.reshape(*lead, 7).to(device, torch.int32).transpose(-1, 0).contiguous().transpose(-1, 0)
    W = W_dec.T.contiguous().to(device).T
    b = torch.stack([b_dec, b_dec], 1).to(device)[:, 0]
    if lead:
        assert not v.is_contiguous() and not i.is_contiguous()
    assert not W.is_contiguous() and not b.is_contiguous()
    prefixes = [3, 9, 24]
    out = prefix_reconstructions(v, i, W, b, prefixes, backend=backend)
    assert out.shape == (3, *lead, 11)
    assert_matches(out, oracle(values, indices, W_dec, b_dec, prefixes), torch.float64, backend)


def test_bfloat16(backend, device):
    prefixes = [8, 20, 48]
    values, indices, W_dec, b_dec = make_code(16, 10, 48, 24, seed=7, zero_frac=0.1)
    bf = [t.to(device, torch.bfloat16) if t.is_floating_point() else t.to(device)
          for t in (values, indices, W_dec, b_dec)]
    out = prefix_reconstructions(*bf, prefixes, backend=backend)
    assert out.dtype == torch.bfloat16
    ref = oracle(*(t.double().cpu() if t.is_floating_point() else t.cpu() for t in bf), prefixes)
    assert_matches(out, ref, torch.bfloat16, backend)
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    losses = prefix_losses(x.to(device, torch.bfloat16), *bf, prefixes, backend=backend)
    assert losses.dtype == torch.float32 and losses.shape == (3,)
    ref_losses = torch.stack([reference.mse_loss(x.bfloat16().double(), r) for r in ref])
    torch.testing.assert_close(losses.double().cpu(), ref_losses, rtol=3e-2, atol=3e-2)


def test_no_entries_gives_b_dec(backend, device):
    values, indices, W_dec, b_dec = to(device, *make_code(3, 0, 10, 4, seed=9))
    out = prefix_reconstructions(values, indices, W_dec, b_dec, [4, 10], backend=backend)
    torch.testing.assert_close(out.cpu(), b_dec.cpu().expand(2, 3, 4), rtol=0, atol=0)


# ---- losses and gradients --------------------------------------------------------------------------------------


def test_losses_sum_to_the_matryoshka_loss(backend, device):
    prefixes = [6, 15, 32]
    values, indices, W_dec, b_dec = make_code(10, 8, 32, 9, seed=10, zero_frac=0.2)
    x = torch.randn(10, 9, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    losses = prefix_losses(*to(device, x, values, indices, W_dec, b_dec), prefixes, backend=backend)
    ref = oracle(values, indices, W_dec, b_dec, prefixes)
    tol = tolerance(torch.float64, backend)
    torch.testing.assert_close(losses.cpu(), torch.stack([reference.mse_loss(x, r) for r in ref]), rtol=tol, atol=tol)
    torch.testing.assert_close(losses.sum().cpu(), reference.matryoshka_loss(x, values, indices, W_dec, b_dec,
                                                                            prefixes), rtol=tol, atol=tol)


def _grads(fn, values, W_dec, b_dec):
    leaves = [t.detach().clone().requires_grad_() for t in (values, W_dec, b_dec)]
    fn(*leaves).backward()
    return [t.grad.cpu() for t in leaves]


@pytest.mark.parametrize("all_in_one_segment", [False, True])
def test_gradients_equal_the_oracle(backend, device, all_in_one_segment):
    prefixes = [5, 12, 30, 40]
    kw = dict(lo=0, hi=5) if all_in_one_segment else {}
    values, indices, W_dec, b_dec = make_code(12, 5, 40, 7, seed=12, zero_frac=0.2, **kw)
    x = torch.randn(12, 7, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)  # prefix losses weighted differently
    xd, id_, wd = to(device, x, indices, weights)
    got = _grads(lambda v, W, b: (prefix_losses(xd, v, id_, W, b, prefixes, backend=backend) * wd).sum(),
                 *to(device, values, W_dec, b_dec))
    want = _grads(lambda v, W, b: sum(wt * reference.mse_loss(x, r) for wt, r in
                                      zip(weights, reference.matryoshka_reconstructions(v, indices, W, b, prefixes))),
                  values, W_dec, b_dec)
    tol = tolerance(torch.float64, backend)
    for name, a, b in zip(("values", "W_dec", "b_dec"), got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())), msg=name)


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_gradcheck(name):
    if name not in ops.available_backends():
        pytest.skip(f"backend {name!r} unavailable here")
    values, indices, W_dec, b_dec = make_code(3, 4, 9, 3, seed=14)
    prefixes = [2, 5, 9]
    fn = lambda v, W, b: prefix_reconstructions(v, indices, W, b, prefixes, backend=name)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (values, W_dec, b_dec)))


# ---- the work: one decode, < 2·B·c slots ----------------------------------------------------------------------


@pytest.mark.parametrize("lo, hi", [(0, 64), (0, 4), (60, 64), (0, 20)])
def test_one_decode_of_fewer_than_twice_the_slots(monkeypatch, lo, hi):
    prefixes = [4, 8, 16, 32, 64]
    B, c = 20, 4 if hi - lo < 10 else 12
    values, indices, W_dec, b_dec = make_code(B, c, 64, 6, seed=15, lo=lo, hi=hi)
    calls = []
    real = ops.sparse_decode

    def counting(v, i, W, b, **kw):
        calls.append(tuple(v.shape))
        return real(v, i, W, b, **kw)

    monkeypatch.setattr(prefix_decode.ops, "sparse_decode", counting)
    out = prefix_reconstructions(values, indices, W_dec, b_dec, prefixes, backend="torch")
    assert_matches(out, oracle(values, indices, W_dec, b_dec, prefixes), torch.float64, "torch")
    assert len(calls) == 1
    R, w = calls[0]
    P = len(prefixes)
    assert R * w < 2 * B * c and R <= 2 * B * P and R <= B * c


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefixes, pattern", [
    ([], r"prefixes must be a non-empty list of ints"),
    ([4, 8.0], r"prefixes must be a non-empty list of ints"),
    ([True, 8], r"prefixes must be a non-empty list of ints"),
    ("8", r"prefixes must be a non-empty list of ints"),
    ([4, 4, 8], r"prefixes must be strictly increasing"),
    ([6, 2, 8], r"prefixes must be strictly increasing"),
    ([0, 8], r"prefixes must be strictly increasing positive"),
    ([2, 6], r"prefixes must end at n = 8"),
    ([2, 9], r"prefixes must end at n = 8"),
])
def test_bad_prefixes(prefixes, pattern):
    values, indices, W_dec, b_dec = make_code(2, 3, 8, 4)
    with pytest.raises(ValueError, match=pattern):
        prefix_reconstructions(values, indices, W_dec, b_dec, prefixes)


def test_bad_shapes_and_indices():
    values, indices, W_dec, b_dec = make_code(2, 3, 8, 4)
    with pytest.raises(ValueError, match=r"values \[2, 3\] and indices \[2, 2\]"):
        prefix_reconstructions(values, indices[:, :2], W_dec, b_dec, [8])
    with pytest.raises(ValueError, match=r"b_dec must have shape \[d\] = \[4\]"):
        prefix_reconstructions(values, indices, W_dec, b_dec[:3], [8])
    with pytest.raises(TypeError, match=r"b_dec .* must match values"):
        prefix_reconstructions(values, indices, W_dec, b_dec.float(), [8])
    with pytest.raises(TypeError, match=r"indices must be int64 or int32"):
        prefix_reconstructions(values, indices.float(), W_dec, b_dec, [8])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n\)"):
        prefix_reconstructions(values, indices + 5, W_dec, b_dec, [4, 8])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n\)"):
        prefix_reconstructions(values, indices - 8, W_dec, b_dec, [4, 8])
    with pytest.raises(ValueError, match=r"x has shape \[2, 5\]"):
        prefix_losses(torch.zeros(2, 5, dtype=torch.float64), values, indices, W_dec, b_dec, [8])
