"""dlmscope.sae.sparsity: the threshold, BatchTopK and JumpReLU rules on the fused Top-K encoder against their dense
oracles in dlmscope.reference — values, widths, edge cases (k=1, B·k above the positives, ties, rows that overflow
their cap, empty rows), leading and non-contiguous inputs, bf16, gradients — on every backend available here."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dlmscope import available_backends, reference
from dlmscope.sae import sparsity as S

from tests.helpers.codes import assert_away_from, assert_code, batchtopk_cut, pre_and_slack
from tests.helpers.devices import native_float64, tolerance
from tests.helpers.saes import make_sae

F64 = torch.float64


def params(B, d, n, seed=0, bias_shift=0.0, dtype=F64, device="cpu"):
    """x [B, d], W_enc [n, d], b_enc [n], b_dec [d] (float64 unless given)."""
    x, W_enc, b_enc, _, b_dec = make_sae(B, d, n, dtype, device, seed=seed, bias_shift=bias_shift)
    return x, W_enc, b_enc, b_dec


def integer_params(B, d, n, seed=0):
    """Small-integer parameters, so pre is an exact integer in float64: many exact ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (B, d), generator=g).to(F64)
    W_enc = torch.randint(-1, 2, (n, d), generator=g).to(F64)
    b_enc = torch.randint(-1, 2, (n,), generator=g).to(F64)
    return x, W_enc, b_enc, torch.zeros(d, dtype=F64)


def dense(values, indices, n):
    """The dense code [..., n] of a padded sparse code (test side only)."""
    flat = reference.densify(values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]), n)
    return flat.reshape(*values.shape[:-1], n)


def check_layout(values, indices, n, cap):
    """Padded layout: int64 indices in [0, n), distinct per row; the width is cap·2^j or n, >= min(cap, n)."""
    c = values.shape[-1]
    assert indices.shape == values.shape and indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) < n
    rows = indices.reshape(-1, c).cpu()
    assert all(len(set(r.tolist())) == c for r in rows), "indices must be distinct within a row"
    assert c == n or (c >= min(cap, n) and c % min(cap, n) == 0 and (c // min(cap, n)) & (c // min(cap, n) - 1) == 0)


def on(device, *tensors):
    return [t.to(device) for t in tensors]


# Codes are compared with tests/helpers/codes.py (float64 where native, else float32 level away from a cut).


def assert_grads(got, want, backend, names):
    """Gradients at 1e-10 where float64 is native, else at ``tolerance`` relative to each gradient's size."""
    tol = tolerance(F64, backend)
    for name, a, b in zip(names, got, want):
        scale = 1.0 if native_float64(backend) else max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol * scale, msg=name)


# ---- threshold_encode -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, d, n, cap, scale", [(9, 6, 40, 4, 0.5), (1, 3, 7, 1, 0.0), (16, 8, 64, 8, 1.5),
                                                 (5, 4, 20, 50, 0.8), (6, 5, 33, 2, 0.2)])
@pytest.mark.parametrize("scalar", [False, True])
def test_threshold_encode_is_the_reference(backend, device, B, d, n, cap, scale, scalar):
    x, W_enc, b_enc, b_dec = params(B, d, n, seed=B + n)
    g = torch.Generator().manual_seed(n)
    threshold = torch.tensor(scale, dtype=F64) if scalar else scale * torch.rand(n, generator=g, dtype=F64)
    values, indices = S.threshold_encode(*on(device, x, W_enc, b_enc, b_dec, threshold), cap, backend=backend)
    check_layout(values, indices, n, cap)
    want = reference.threshold_encode(x, W_enc, b_enc, b_dec, threshold)
    got = dense(values, indices, n).cpu()
    assert_code(got, want, backend, (x, W_enc, b_enc, b_dec), threshold)
    # the width follows the rows' own counts (the reference's where float64 is native: equal, checked above)
    most, width = int((got != 0).sum(-1).max()), values.shape[-1]
    if most < min(cap, n):
        assert width == min(cap, n)  # no row overflows: the width is the cap, not n
    else:  # doubled until wider than the widest row (or n), never further
        assert most < width <= 2 * most or width == n


def test_threshold_encode_overflowing_rows_widen_only_as_needed(backend, device):
    B, d, n = 8, 6, 96
    x, W_enc, b_enc, b_dec = params(B, d, n, seed=3)
    threshold = torch.tensor(2.0, dtype=F64)
    want = reference.threshold_encode(x, W_enc, b_enc, b_dec, threshold)
    most = int((want != 0).sum(-1).max())
    assert 4 < most < n // 4  # several doublings from cap 1, far from n
    values, indices = S.threshold_encode(*on(device, x, W_enc, b_enc, b_dec, threshold), 1, backend=backend)
    check_layout(values, indices, n, 1)
    got = dense(values, indices, n).cpu()
    assert_code(got, want, backend, (x, W_enc, b_enc, b_dec), threshold)
    most = int((got != 0).sum(-1).max())  # the reference's where float64 is native (equal codes)
    assert most < values.shape[-1] <= 2 * most and values.shape[-1] < n  # the output width is the cap's, not n


def test_threshold_encode_empty_rows_and_a_zero_threshold(backend, device):
    B, d, n = 6, 5, 30
    x, W_enc, b_enc, b_dec = params(B, d, n, seed=4)
    values, indices = S.threshold_encode(*on(device, x, W_enc, b_enc, b_dec, torch.tensor(1e6, dtype=F64)), 3,
                                         backend=backend)
    assert values.shape == (B, 3) and not values.any()  # nothing above threshold: all slots empty, width = cap
    check_layout(values, indices, n, 3)
    zero = torch.zeros((), dtype=F64)  # threshold 0: every positive pre, i.e. relu(pre)
    values, indices = S.threshold_encode(*on(device, x, W_enc, b_enc, b_dec, zero), 3, backend=backend)
    relu = reference.pre_activations(x, W_enc, b_enc, b_dec).clamp_min(0)
    assert_code(dense(values, indices, n), relu, backend, (x, W_enc, b_enc, b_dec), zero)


def test_threshold_encode_exact_ties_at_the_threshold_are_dropped():
    x, W_enc, b_enc, b_dec = integer_params(10, 4, 24)
    threshold = torch.ones(24, dtype=F64)  # pre is an integer: many entries equal the threshold exactly
    pre = reference.pre_activations(x, W_enc, b_enc, b_dec)
    assert bool((pre == 1).any()) and bool((pre > 1).any())
    values, indices = S.threshold_encode(x, W_enc, b_enc, b_dec, threshold, 2, backend="torch")
    assert torch.equal(dense(values, indices, 24), reference.threshold_encode(x, W_enc, b_enc, b_dec, threshold))


# ---- batch_topk_encode ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, d, n, k, cap, shift", [(8, 6, 40, 1, 1, 0.0), (8, 6, 40, 3, 12, 0.0),
                                                    (16, 8, 64, 4, 8, 0.0), (5, 4, 20, 6, 6, -2.0),
                                                    (1, 3, 9, 2, 2, 0.0), (7, 5, 30, 30, 30, 0.0)])
def test_batch_topk_encode_is_the_reference(backend, device, B, d, n, k, cap, shift):
    x, W_enc, b_enc, b_dec = params(B, d, n, seed=B * k, bias_shift=shift)
    values, indices, tau = S.batch_topk_encode(*on(device, x, W_enc, b_enc, b_dec), k, cap, backend=backend)
    check_layout(values, indices, n, max(cap, k))
    want = reference.batchtopk_encode(x, W_enc, b_enc, b_dec, k)
    cut = batchtopk_cut(x, W_enc, b_enc, b_dec, k)
    assert_code(dense(values, indices, n), want, backend, (x, W_enc, b_enc, b_dec), cut)
    positives = int((reference.pre_activations(x, W_enc, b_enc, b_dec) > 0).sum())
    # tau and the smallest kept value: the reference's, to float32 rounding where float64 is not native
    _, slack = pre_and_slack(backend, x, W_enc, b_enc, b_dec)
    tol = {} if native_float64(backend) else dict(rtol=0, atol=float(slack.max()))
    if positives >= B * k:
        assert int((want > 0).sum()) == B * k
        assert float(tau) == pytest.approx(float(want[want > 0].min()), abs=tol.get("atol"))
    else:  # fewer positives than B·k: tau = 0, every positive entry kept
        assert float(tau) == 0.0 and int((want > 0).sum()) == positives
    torch.testing.assert_close(S.batch_topk_min_selected(values).cpu(), reference.batchtopk_min_selected(want), **tol)


def test_batch_topk_encode_fewer_positives_than_b_times_k(backend, device):
    x, W_enc, b_enc, b_dec = params(6, 5, 24, seed=5, bias_shift=-2.5)
    pre = reference.pre_activations(x, W_enc, b_enc, b_dec)
    assert 0 < int((pre > 0).sum()) < 6 * 4
    values, indices, tau = S.batch_topk_encode(*on(device, x, W_enc, b_enc, b_dec), 4, 4, backend=backend)
    assert float(tau) == 0.0
    assert_code(dense(values, indices, 24), pre.clamp_min(0), backend, (x, W_enc, b_enc, b_dec), 0.0)


def test_batch_topk_encode_one_row_takes_most_of_the_batch(backend, device):
    """Row 0 is scaled up: it holds most of the batch's top B·k entries, far more than its cap of 2."""
    B, d, n, k = 8, 6, 64, 2
    x, W_enc, b_enc, b_dec = params(B, d, n, seed=6)
    x[0] *= 20
    want = reference.batchtopk_encode(x, W_enc, b_enc, b_dec, k)
    assert int((want[0] > 0).sum()) > 4 * k
    values, indices, _ = S.batch_topk_encode(*on(device, x, W_enc, b_enc, b_dec), k, k, backend=backend)
    check_layout(values, indices, n, k)
    assert values.shape[-1] < n
    cut = batchtopk_cut(x, W_enc, b_enc, b_dec, k)
    assert_code(dense(values, indices, n), want, backend, (x, W_enc, b_enc, b_dec), cut)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_batch_topk_encode_keeps_every_tie_at_tau(k):
    x, W_enc, b_enc, b_dec = integer_params(12, 4, 24, seed=k)
    want = reference.batchtopk_encode(x, W_enc, b_enc, b_dec, k)
    assert int((want > 0).sum()) > 12 * k  # ties at tau: more than B·k kept
    for backend in ("torch", "cpu") if "cpu" in available_backends() else ("torch",):
        values, indices, tau = S.batch_topk_encode(x, W_enc, b_enc, b_dec, k, 1, backend=backend)
        assert torch.equal(dense(values, indices, 24), want)
        assert float(tau) == float(want[want > 0].min())


@pytest.mark.parametrize("B, d, n, k, cap, k_aux, n_masked", [(8, 6, 40, 3, 3, 5, 12), (8, 6, 40, 2, 2, 6, 3),
                                                              (5, 4, 20, 2, 2, 4, 0), (5, 4, 20, 2, 2, 3, 20),
                                                              (6, 4, 20, 2, 2, 0, 5)])
def test_batch_topk_encode_aux_is_the_code_and_the_dense_auxk_selection(backend, device, B, d, n, k, cap, k_aux,
                                                                        n_masked):
    """The code is batch_topk_encode's (the reference's); the AuxK selection is, per row, the k_aux largest relu'd
    pre-activations among the masked latents, zero past the masked ones — also for row 0, which overflows its cap
    and is re-encoded wider (its selection is the first call's, over all n latents). No mask, all masked, k_aux 0."""
    x, W_enc, b_enc, b_dec = params(B, d, n, seed=B + k_aux)
    x[0] *= 20
    g = torch.Generator().manual_seed(n_masked)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:n_masked]] = True
    values, indices, tau, a_v, a_i = S.batch_topk_encode_aux(*on(device, x, W_enc, b_enc, b_dec), k, cap,
                                                             mask.to(device), k_aux, backend=backend)
    assert values.shape[-1] > max(cap, k)  # row 0 was re-encoded
    want = reference.batchtopk_encode(x, W_enc, b_enc, b_dec, k)
    cut = batchtopk_cut(x, W_enc, b_enc, b_dec, k)
    assert_code(dense(values, indices, n), want, backend, (x, W_enc, b_enc, b_dec), cut)
    assert a_v.shape == a_i.shape == (B, k_aux) and a_i.dtype == torch.int64
    pre, slack = pre_and_slack(backend, x, W_enc, b_enc, b_dec)
    top = torch.where(mask, pre.clamp_min(0), float("-inf")).topk(k_aux, dim=1).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    tol = float(slack.max()) if k_aux else 0.0
    torch.testing.assert_close(a_v.cpu().sort(1, descending=True).values, top, rtol=0, atol=tol + 1e-12)
    positive = a_v.cpu() > 0  # a kept entry is a masked latent's own relu'd pre-activation
    assert bool(mask[a_i.cpu()[positive]].all())
    torch.testing.assert_close(a_v.cpu()[positive], pre.gather(1, a_i.cpu())[positive], rtol=0, atol=tol + 1e-12)


# ---- leading dims, non-contiguous input, bf16 -------------------------------------------------------------------


def test_leading_dims_and_non_contiguous_inputs(backend, device):
    d, n = 6, 40
    x, W_enc, b_enc, b_dec = params(24, d, n, seed=7)
    x3 = x.reshape(4, 6, d)
    xt = x.T.contiguous().T  # same values, column-major strides
    threshold = 0.5 * torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert not xt.is_contiguous()
    for xin in (x3, xt, x3.transpose(0, 1)):
        values, indices = S.threshold_encode(*on(device, xin, W_enc, b_enc, b_dec, threshold), 3, backend=backend)
        assert values.shape[:-1] == xin.shape[:-1]
        want = reference.threshold_encode(xin.reshape(-1, d), W_enc, b_enc, b_dec, threshold)
        assert_code(dense(values, indices, n), want, backend, (xin, W_enc, b_enc, b_dec), threshold)
        values, indices, _ = S.batch_topk_encode(*on(device, xin, W_enc, b_enc, b_dec), 2, 2, backend=backend)
        assert values.shape[:-1] == xin.shape[:-1]  # BatchTopK's batch is every leading row
        want = reference.batchtopk_encode(xin.reshape(-1, d), W_enc, b_enc, b_dec, 2)
        assert_code(dense(values, indices, n), want, backend, (xin, W_enc, b_enc, b_dec),
                    batchtopk_cut(xin, W_enc, b_enc, b_dec, 2))
    values, indices = S.threshold_encode(*on(device, x[0], W_enc, b_enc, b_dec, threshold), 3, backend=backend)
    assert values.dim() == 1  # one row in, one row out


def test_bf16_matches_the_reference_loosely(backend, device):
    n = 48
    x, W_enc, b_enc, b_dec = params(16, 8, n, seed=8, dtype=torch.bfloat16)
    wide = [t.double() for t in (x, W_enc, b_enc, b_dec)]
    threshold = torch.full((n,), 0.5, dtype=torch.bfloat16)
    values, indices = S.threshold_encode(*on(device, x, W_enc, b_enc, b_dec, threshold), 4, backend=backend)
    assert values.dtype == torch.bfloat16
    want = reference.threshold_encode(*wide, threshold.double())
    assert (dense(values.double(), indices, n).cpu() - want).norm() / want.norm() < 3e-2
    values, indices, tau = S.batch_topk_encode(*on(device, x, W_enc, b_enc, b_dec), 4, 4, backend=backend)
    got, pre = dense(values.double(), indices, n).cpu(), reference.pre_activations(*wide)
    want = reference.batchtopk_encode(*wide, 4)
    # bf16 has many exact ties near tau (all kept): the kept sets may differ only within bf16 resolution of tau
    differ = (got != 0) != (want != 0)
    assert bool(((pre[differ] - float(tau)).abs() < 2e-2 * float(tau)).all())
    both = (got != 0) & (want != 0)
    torch.testing.assert_close(got[both], want[both], rtol=2e-2, atol=2e-2)
    assert int((got != 0).sum()) >= 16 * 4


# ---- gradients --------------------------------------------------------------------------------------------------


def _grads_sparse(fn, tensors, G, n):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    values, indices = fn(*leaves)[:2]
    (dense(values, indices, n) * G).sum().backward()
    return [t.grad for t in leaves]


def _grads_dense(fn, tensors, G):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    (fn(*leaves) * G).sum().backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("rule", ["threshold", "batchtopk"])
def test_gradients_match_dense_autograd_through_the_reference(backend, device, rule):
    B, d, n = 10, 6, 40
    tensors = params(B, d, n, seed=9)
    G = torch.randn(B, n, generator=torch.Generator().manual_seed(2), dtype=F64)
    threshold = 0.4 * torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=F64)
    if rule == "threshold":
        def ours(*t): return S.threshold_encode(*t, threshold.to(device), 2, backend=backend)
        def ref(*t): return reference.threshold_encode(*t, threshold)
        cut = threshold
    else:
        def ours(*t): return S.batch_topk_encode(*t, 3, 2, backend=backend)
        def ref(*t): return reference.batchtopk_encode(*t, 3)
        cut = batchtopk_cut(*tensors, 3)
    assert_away_from(backend, tensors, cut)  # a float32 backend selects the same entries
    got = _grads_sparse(ours, on(device, *tensors), G.to(device), n)
    want = _grads_dense(ref, tensors, G)
    assert_grads(got, want, backend, ("x", "W_enc", "b_enc", "b_dec"))


@pytest.mark.parametrize("rule", ["threshold", "batchtopk", "batchtopk_aux", "jumprelu"])
def test_gradcheck(rule):
    B, d, n = 4, 3, 10
    tensors = [t.requires_grad_(True) for t in params(B, d, n, seed=10)]
    threshold = 0.3 * torch.rand(n, generator=torch.Generator().manual_seed(4), dtype=F64)

    def fn(*t):
        if rule == "threshold":
            return S.threshold_encode(*t, threshold, 2, backend="torch")[0]
        if rule == "batchtopk":
            return S.batch_topk_encode(*t, 2, 1, backend="torch")[0]
        if rule == "batchtopk_aux":  # the AuxK selection's values (the code's are the rule above's)
            return S.batch_topk_encode_aux(*t, 2, 1, torch.arange(n) % 3 > 0, 3, backend="torch")[3]
        return S.jumprelu_encode(*t, threshold, 0.05, 2, backend="torch")[0]

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-7, atol=1e-6)


# ---- JumpReLU ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps, theta_scale", [(0.5, 0.6), (0.2, 0.3), (0.8, 0.1)])
def test_jumprelu_values_and_all_gradients_match_the_reference(backend, device, eps, theta_scale):
    """theta_scale 0.1 with eps 0.8: θ < ε/2, so the lowered selection threshold θ − ε/2 is negative."""
    B, d, n = 12, 6, 40
    tensors = params(B, d, n, seed=11)
    theta = theta_scale * (0.5 + torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=F64))
    G = torch.randn(B, n, generator=torch.Generator().manual_seed(6), dtype=F64)
    lam = 0.7
    pre_ref = reference.pre_activations(*tensors)
    window = ((pre_ref - theta).abs() < eps / 2)
    assert bool((window & (pre_ref <= theta)).any()), "the test needs window entries below θ"
    # a float32 backend puts every entry on the same side of θ and of the window's edges as float64
    assert_away_from(backend, tensors, theta, theta - eps / 2, theta + eps / 2)

    leaves = [t.clone().requires_grad_(True) for t in tensors] + [theta.clone().requires_grad_(True)]
    pre_d = reference.pre_activations(*leaves[:4])
    out = reference.jumprelu(pre_d, leaves[4], eps)
    l0_ref = reference.jumprelu_l0(pre_d, leaves[4], eps)
    ((out * G).sum() + lam * l0_ref).backward()
    want = [t.grad for t in leaves]

    mine = [t.clone().requires_grad_(True) for t in on(device, *tensors, theta)]
    pre, indices = S.jumprelu_candidates(*mine[:4], mine[4], eps, 2, backend=backend)
    values = S.jumprelu(pre, indices, mine[4], eps)
    l0 = S.jumprelu_l0(pre, indices, mine[4], eps)
    assert values.shape[-1] < n
    assert_code(dense(values, indices, n), out, backend, tensors, theta)
    torch.testing.assert_close(l0.cpu(), l0_ref.detach())
    ((dense(values, indices, n) * G.to(device)).sum() + lam * l0).backward()
    assert_grads([t.grad for t in mine], want, backend, ("x", "W_enc", "b_enc", "b_dec", "threshold"))
    assert want[4].abs().sum() > 0  # the straight-through terms were exercised


class _CountOps(TorchDispatchMode):
    """Counts the calls of each aten op."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_jumprelu_with_l0_is_jumprelu_and_jumprelu_l0_from_one_gather():
    """Values, L0 and every gradient (θ's included) those of jumprelu and jumprelu_l0 apart; θ gathered per slot
    once forward and scattered once backward."""
    eps, G = 0.3, torch.randn(8, 40, generator=torch.Generator().manual_seed(8), dtype=F64)
    tensors = params(8, 5, 40, seed=16)
    theta = 0.3 + 0.4 * torch.rand(40, generator=torch.Generator().manual_seed(9), dtype=F64)
    results = []
    for joint in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (*tensors, theta)]
        pre, indices = S.jumprelu_candidates(*leaves[:4], leaves[4], eps, 2, backend="torch")
        with _CountOps() as mode:
            if joint:
                values, l0 = S.jumprelu_with_l0(pre, indices, leaves[4], eps)
            else:
                values, l0 = S.jumprelu(pre, indices, leaves[4], eps), S.jumprelu_l0(pre, indices, leaves[4], eps)
            ((dense(values, indices, 40) * G).sum() + 0.7 * l0).backward()
        results.append((values, l0, [t.grad for t in leaves], mode.calls))
    (v0, l0_0, g0, calls0), (v1, l0_1, g1, calls1) = results
    assert torch.equal(v0, v1) and torch.equal(l0_0, l0_1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert g1[4].abs().sum() > 0
    assert calls0.get("aten.index") == 2 and calls1.get("aten.index") == 1  # θ[indices]
    scatters = [sum(c.get(op, 0) for op in ("aten.index_put", "aten._index_put_impl", "aten.index_add"))
                for c in (calls0, calls1)]  # θ's backward, and the test's densify
    assert scatters[0] == scatters[1] + 1, (calls0, calls1)


def test_jumprelu_encode_equals_threshold_encode_in_value():
    x, W_enc, b_enc, b_dec = params(8, 5, 30, seed=12)
    theta = 0.5 * torch.rand(30, generator=torch.Generator().manual_seed(7), dtype=F64)
    values, indices = S.jumprelu_encode(x, W_enc, b_enc, b_dec, theta, 0.3, 4)
    v2, i2 = S.threshold_encode(x, W_enc, b_enc, b_dec, theta, 4)
    torch.testing.assert_close(dense(values, indices, 30), dense(v2, i2, 30), rtol=0, atol=1e-12)
    pre, idx = S.jumprelu_candidates(x, W_enc, b_enc, b_dec, theta, 0.3, 4)
    assert bool(torch.isinf(pre).any()) and not bool(torch.isnan(S.jumprelu(pre, idx, theta, 0.3)).any())


# ---- no B×n tensor; bad input -----------------------------------------------------------------------------------


class _Shapes(TorchDispatchMode):
    """Records every tensor an op outside the fused encoder creates (a custom op is one op: its inside is unseen)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.numels.append((str(func), o.numel()))
        return out


@pytest.mark.parametrize("rule", ["threshold", "batchtopk", "jumprelu"])
def test_no_tensor_of_b_times_n_outside_the_fused_encoder(backend, device, rule):
    """Forward and backward: nothing our code creates is as big as B×n (d < B, so W_enc's gradient [n, d] is
    smaller); what runs inside ``ops.topk_encode`` is each backend's own business (``torch`` is unfused)."""
    B, d, n = 12, 5, 97
    tensors = [t.requires_grad_(True) for t in on(device, *params(B, d, n, seed=13))]
    theta = torch.full((n,), 0.5, dtype=F64, device=device, requires_grad=True)
    with _Shapes() as seen:
        if rule == "threshold":
            values, indices = S.threshold_encode(*tensors, theta, 4, backend=backend)
            loss = values.sum()
        elif rule == "batchtopk":
            values, indices, _ = S.batch_topk_encode(*tensors, 2, 4, backend=backend)
            loss = values.sum()
        else:
            pre, indices = S.jumprelu_candidates(*tensors, theta, 0.2, 4, backend=backend)
            loss = S.jumprelu(pre, indices, theta, 0.2).sum() + S.jumprelu_l0(pre, indices, theta, 0.2)
        loss.backward()
    assert (pre if rule == "jumprelu" else values).shape[-1] < n  # the width is the cap's (4), not n
    big = [(f, m) for f, m in seen.numels if m >= B * n]
    assert not big, big


def test_threshold_encode_takes_a_python_float_and_gives_the_threshold_no_gradient():
    x, W_enc, b_enc, b_dec = params(6, 4, 20, seed=14)
    theta = torch.tensor(0.3, dtype=F64, requires_grad=True)
    values, indices = S.threshold_encode(x, W_enc, b_enc.requires_grad_(True), b_dec, theta, 2)
    v2, i2 = S.threshold_encode(x, W_enc, b_enc, b_dec, 0.3, 2)
    assert torch.equal(dense(values, indices, 20), dense(v2, i2, 20))
    values.sum().backward()
    assert theta.grad is None and b_enc.grad is not None


def test_bad_arguments_raise():
    x, W_enc, b_enc, b_dec = params(4, 3, 10)
    with pytest.raises(ValueError, match="cap"):
        S.threshold_encode(x, W_enc, b_enc, b_dec, torch.zeros(()), 0)
    with pytest.raises(ValueError, match="threshold must be 0-d or"):
        S.threshold_encode(x, W_enc, b_enc, b_dec, torch.zeros(3), 2)
    with pytest.raises(ValueError, match="k must be"):
        S.batch_topk_encode(x, W_enc, b_enc, b_dec, 11, 2)
    with pytest.raises(ValueError, match="eps"):
        S.jumprelu_encode(x, W_enc, b_enc, b_dec, torch.ones(10), 0.0, 2)
