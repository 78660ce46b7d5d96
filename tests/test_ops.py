"""Every backend's ops equal the float64 reference (dlmscope.reference) — values, selections and gradients."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlmscope
from dlmscope import ops, reference
from dlmscope.backends import get_backend
from dlmscope.backends.base import in_native_dtype

from tests.helpers.devices import backend_device, backend_params, native_float64, tolerance
from tests.helpers.saes import check_topk, make_sae

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("backend_name", backend_params())
def test_topk_encode_matches_reference(backend_name, data):
    device = backend_device(backend_name)
    B = data.draw(st.integers(1, 9), label="B")
    d = data.draw(st.integers(1, 37), label="d")
    n = data.draw(st.integers(1, 70), label="n")
    k = data.draw(st.integers(1, n), label="k")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shift = data.draw(st.sampled_from([0.0, -1.5]), label="bias_shift")  # -1.5: many rows with < k positives
    x, W_enc, b_enc, _, b_dec = make_sae(B, d, n, dtype, device, seed=data.draw(st.integers(0, 2**16)),
                                         bias_shift=shift)
    values, indices = dlmscope.topk_encode(x, W_enc, b_enc, b_dec, k, backend=backend_name)
    check_topk(values, indices, x, W_enc, b_enc, b_dec, k, tolerance(dtype, backend_name))


@pytest.mark.parametrize("k", [1, 7, 64])
def test_topk_encode_edge_k(backend, device, k):
    """k = 1 and k = n, d not a power of two."""
    x, W_enc, b_enc, _, b_dec = make_sae(5, 19, 64, torch.float32, device, seed=k)
    values, indices = dlmscope.topk_encode(x, W_enc, b_enc, b_dec, k, backend=backend)
    check_topk(values, indices, x, W_enc, b_enc, b_dec, k, tolerance(torch.float32, backend))


def test_topk_encode_ties(backend, device):
    """Duplicate encoder rows give exactly tied pre-activations; any tie-break is valid, sets must be distinct."""
    x, W_enc, b_enc, _, b_dec = make_sae(6, 10, 24, torch.float32, device, seed=3)
    W_enc = W_enc[:6].repeat(4, 1)
    b_enc = b_enc[:6].repeat(4)
    values, indices = dlmscope.topk_encode(x, W_enc, b_enc, b_dec, 9, backend=backend)
    check_topk(values, indices, x, W_enc, b_enc, b_dec, 9, tolerance(torch.float32, backend))


def test_topk_encode_all_negative_rows_pad_with_zeros(backend, device):
    x, W_enc, b_enc, _, b_dec = make_sae(4, 12, 30, torch.float32, device, seed=5)
    b_enc = torch.full_like(b_enc, -100.0)
    values, indices = dlmscope.topk_encode(x, W_enc, b_enc, b_dec, 5, backend=backend)
    assert torch.equal(values.cpu(), torch.zeros(4, 5))
    check_topk(values, indices, x, W_enc, b_enc, b_dec, 5, tolerance(torch.float32, backend))


def test_topk_encode_non_contiguous_and_leading_dims(backend, device):
    x, W_enc, b_enc, _, b_dec = make_sae(24, 16, 40, torch.float32, device, seed=7)
    x_nc = x.T.contiguous().T.reshape(2, 12, 16)  # same values, column-major storage
    assert not x_nc.is_contiguous()
    W_big = torch.randn(40, 32, device=device)
    W_big[:, ::2] = W_enc
    W_nc = W_big[:, ::2]
    assert not W_nc.is_contiguous()
    values, indices = dlmscope.topk_encode(x_nc, W_nc, b_enc, b_dec, 6, backend=backend)
    assert values.shape == (2, 12, 6) and indices.shape == (2, 12, 6)
    check_topk(values.reshape(24, 6), indices.reshape(24, 6), x, W_enc, b_enc, b_dec, 6,
               tolerance(torch.float32, backend))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("backend_name", backend_params())
def test_sparse_decode_matches_reference(backend_name, data):
    device = backend_device(backend_name)
    B = data.draw(st.integers(1, 9), label="B")
    d = data.draw(st.integers(1, 37), label="d")
    n = data.draw(st.integers(1, 50), label="n")
    k = data.draw(st.integers(1, 12), label="k")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    values = torch.randn(B, k, generator=g, dtype=torch.float64)
    indices = torch.randint(0, n, (B, k), generator=g)  # duplicates allowed: they add up
    W_dec = torch.randn(n, d, generator=g, dtype=torch.float64)
    b_dec = torch.randn(d, generator=g, dtype=torch.float64)
    args = [t.to(device=device, dtype=dtype) for t in (values, W_dec, b_dec)]
    out = dlmscope.sparse_decode(args[0], indices.to(device), args[1], args[2], backend=backend_name)
    assert out.shape == (B, d) and out.dtype == dtype
    ref = reference.sparse_decode(*(a.cpu().double() for a in args[:1]), indices, args[1].cpu().double(),
                                  args[2].cpu().double())
    scale = float((args[0].cpu().double().abs().sum(1).max()) * args[1].cpu().double().abs().max()) + 1.0
    torch.testing.assert_close(out.cpu().double(), ref, atol=tolerance(dtype, backend_name) * scale, rtol=0)


def test_sparse_decode_int32_indices_and_leading_dims(backend, device):
    values = torch.rand(2, 3, 4, device=device)
    indices = torch.randint(0, 10, (2, 3, 4), device=device, dtype=torch.int32)
    W_dec, b_dec = torch.randn(10, 6, device=device), torch.randn(6, device=device)
    out = dlmscope.sparse_decode(values, indices, W_dec, b_dec, backend=backend)
    ref = reference.sparse_decode(values.reshape(6, 4).cpu(), indices.reshape(6, 4).long().cpu(), W_dec.cpu(),
                                  b_dec.cpu())
    torch.testing.assert_close(out.reshape(6, 6).cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference(backend, device, dtype):
    """Full SAE loss: the backend's gradients equal autograd through the reference, at the same selection."""
    x, W_enc, b_enc, W_dec, b_dec = make_sae(11, 21, 53, dtype, device, seed=11)
    k = 7
    params = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]
    values, indices = dlmscope.topk_encode(params[0], params[1], params[2], params[4], k, backend=backend)
    x_hat = dlmscope.sparse_decode(values, indices, params[3], params[4], backend=backend)
    target = torch.randn_like(x_hat)
    wide = torch.promote_types(dtype, torch.float32)
    ((x_hat.to(wide) - target.to(wide)) ** 2).sum().backward()
    got = [p.grad.cpu().double() for p in params]

    ref_params = [p.detach().cpu().double().requires_grad_() for p in params]
    rx, rWe, rbe, rWd, rbd = ref_params
    pre = reference.pre_activations(rx, rWe, rbe, rbd)
    ref_values = torch.relu(pre.gather(1, indices.cpu()))  # the backend's selection, reference arithmetic
    ref_hat = reference.sparse_decode(ref_values, indices.cpu(), rWd, rbd)
    ((ref_hat - target.cpu().double()) ** 2).sum().backward()
    tol = tolerance(dtype, backend) * (10 if dtype in (torch.bfloat16, torch.float16) else 1)
    for name, g, r in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], got, (p.grad for p in ref_params)):
        scale = float(r.abs().max()) + 1e-6
        torch.testing.assert_close(g, r, atol=tol * scale, rtol=0, msg=lambda m, name=name: f"d{name}: {m}")


def test_encoder_gradients_without_input_grad(backend, device):
    """SAE training never needs dx: it is skipped, and the parameter gradients (db_dec included) still agree."""
    x, W_enc, b_enc, _, b_dec = make_sae(9, 14, 33, torch.float32, device, seed=12)
    params = [t.clone().requires_grad_() for t in (W_enc, b_enc, b_dec)]
    values, _ = dlmscope.topk_encode(x, *params[:2], params[2], 5, backend=backend)
    (values * torch.arange(5, device=device)).sum().backward()
    x2 = x.clone().requires_grad_()
    ref = [t.clone().requires_grad_() for t in (W_enc, b_enc, b_dec)]
    values2, _ = dlmscope.topk_encode(x2, *ref[:2], ref[2], 5, backend=backend)
    (values2 * torch.arange(5, device=device)).sum().backward()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref[2].grad, -x2.grad.sum(0), atol=1e-4, rtol=1e-4)


def test_gradcheck_float64(backend, device):
    if not native_float64(backend):
        pytest.skip(f"{backend} computes in float32; gradients are compared in test_gradients_match_reference")
    x, W_enc, b_enc, W_dec, b_dec = make_sae(5, 9, 17, torch.float64, device, seed=2)
    inputs = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]

    def sae(x, W_enc, b_enc, W_dec, b_dec):
        values, indices = dlmscope.topk_encode(x, W_enc, b_enc, b_dec, 4, backend=backend)
        return dlmscope.sparse_decode(values, indices, W_dec, b_dec, backend=backend)

    assert torch.autograd.gradcheck(sae, inputs)


def _opcheck_dtype(backend):
    return torch.float64 if native_float64(backend) else torch.float32


def test_opcheck_topk_encode(backend, device):
    dtype = _opcheck_dtype(backend)
    x, W_enc, b_enc, _, b_dec = make_sae(6, 10, 20, dtype, device, seed=4)
    args = [t.requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
    torch.library.opcheck(ops._topk_encode_op, (*args, 5, backend))


def test_opcheck_sparse_decode(backend, device):
    dtype = _opcheck_dtype(backend)
    values = torch.rand(6, 5, dtype=dtype, device=device, requires_grad=True)
    indices = torch.randint(0, 20, (6, 5), device=device)
    W_dec = torch.randn(20, 10, dtype=dtype, device=device, requires_grad=True)
    b_dec = torch.randn(10, dtype=dtype, device=device, requires_grad=True)
    torch.library.opcheck(ops._sparse_decode_op, (values, indices, W_dec, b_dec, backend))


def test_opcheck_decoder_norm_step(backend, device):
    dtype = _opcheck_dtype(backend)
    W = torch.nn.functional.normalize(torch.randn(20, 10, dtype=dtype, device=device), dim=1)
    grad = torch.randn_like(W)
    torch.library.opcheck(ops._decoder_norm_step_op,
                          (W, grad, torch.rand_like(W), torch.rand_like(W), 3, 1e-3, 0.9, 0.999, 1e-8, backend))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_norm_step_matches_reference(backend, device, dtype):
    g = torch.Generator().manual_seed(9)
    n, d = 37, 23
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    m = 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    v = 0.01 * torch.rand(n, d, generator=g, dtype=torch.float64)
    ours = [t.to(device=device, dtype=dtype) for t in (W, m, v)]
    refs = [t.to(dtype).double().clone() for t in (W, m, v)]  # the same start, rounded to dtype; never aliases ours
    for step in (1, 2, 3):
        grad = torch.randn(n, d, generator=g, dtype=torch.float64)
        grad_ours = grad.to(device=device, dtype=dtype)
        grad_copy = grad_ours.clone()
        dlmscope.decoder_norm_step(ours[0], grad_ours, ours[1], ours[2], step, 1e-2, (0.9, 0.99), 1e-8,
                                   backend=backend)
        assert torch.equal(grad_ours, grad_copy), "grad must be read only"
        reference.decoder_norm_step(refs[0], grad_ours.cpu().double(), refs[1], refs[2], step, 1e-2, (0.9, 0.99),
                                    1e-8)
    tol = tolerance(dtype, backend) * (5 if dtype in (torch.bfloat16, torch.float16) else 1)
    for got, ref in zip(ours, refs):
        torch.testing.assert_close(got.cpu().double(), ref, atol=tol * (float(ref.abs().max()) + 1e-12), rtol=0)
    norms = ours[0].double().norm(dim=1).cpu()
    torch.testing.assert_close(norms, torch.ones(n, dtype=torch.float64), atol=10 * tol, rtol=0)


#: decoder rows made zero by _zero_row_case (see there)
ZERO_STAY, ZERO_GROW, ZERO_PUSHED = [0, 5, 11], [3, 8], [9]


def _zero_row_case(n, d, seed):
    """(W, grad, m, v) in float64 with zero decoder rows: STAY (zero W, grad, moments: must stay exactly zero),
    GROW (zero W and moments, nonzero grad: a unit row after the step), PUSHED (zero W and grad, nonzero exp_avg:
    also a unit row); the other rows are ordinary unit rows with nonzero grads."""
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    grad = torch.randn(n, d, generator=g, dtype=torch.float64)
    m = 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    v = 0.01 * torch.rand(n, d, generator=g, dtype=torch.float64)
    W[ZERO_STAY + ZERO_GROW + ZERO_PUSHED] = 0
    grad[ZERO_STAY + ZERO_PUSHED] = 0
    m[ZERO_STAY + ZERO_GROW] = 0
    v[ZERO_STAY + ZERO_GROW] = 0
    return W, grad, m, v


def test_reference_zero_rows():
    """The oracle's definition: a zero row has no direction (grad unprojected, normalize keeps it zero)."""
    W, grad, m, v = _zero_row_case(12, 7, seed=4)
    projected = reference.project_out_parallel(grad, W)
    assert torch.equal(projected[ZERO_GROW], grad[ZERO_GROW])
    normalized = reference.normalize_rows(W)
    assert torch.equal(normalized[ZERO_STAY + ZERO_GROW], W[ZERO_STAY + ZERO_GROW])
    reference.decoder_norm_step(W, grad, m, v, 1, 1e-2, (0.9, 0.99), 1e-8)
    assert all(bool(t.isfinite().all()) for t in (W, m, v))
    assert bool((W[ZERO_STAY] == 0).all() and (m[ZERO_STAY] == 0).all() and (v[ZERO_STAY] == 0).all())
    nonzero = [i for i in range(12) if i not in ZERO_STAY]
    torch.testing.assert_close(W[nonzero].norm(dim=1), torch.ones(len(nonzero), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_norm_step_zero_rows(backend, device, dtype):
    """Zero decoder rows as the reference defines them, on every backend: no NaN/Inf; a zero row with zero grad
    and moments stays exactly zero, one with a nonzero grad (or exp_avg) becomes a unit row; all rows, and the
    moments, equal the reference's, over steps 1..3 (the stay-zero rows keep a zero grad throughout)."""
    n, d = 12, 19
    W, grad, m, v = _zero_row_case(n, d, seed=21)
    ours = [t.to(device=device, dtype=dtype) for t in (W, m, v)]
    refs = [t.to(dtype).double().clone() for t in (W, m, v)]
    g = torch.Generator().manual_seed(22)
    tol = tolerance(dtype, backend) * (5 if dtype == torch.bfloat16 else 1)
    for step in (1, 2, 3):
        if step > 1:
            grad = torch.randn(n, d, generator=g, dtype=torch.float64)
            grad[ZERO_STAY] = 0
        grad_ours = grad.to(device=device, dtype=dtype)
        dlmscope.decoder_norm_step(ours[0], grad_ours, ours[1], ours[2], step, 1e-2, (0.9, 0.99), 1e-8,
                                   backend=backend)
        reference.decoder_norm_step(refs[0], grad_ours.cpu().double(), refs[1], refs[2], step, 1e-2, (0.9, 0.99),
                                    1e-8)
        got = [t.cpu().double() for t in ours]
        for name, t in zip(("W", "exp_avg", "exp_avg_sq"), got):
            assert bool(t.isfinite().all()), f"step {step}: non-finite {name}"
            assert bool((t[ZERO_STAY] == 0).all()), f"step {step}: zero row of {name} did not stay zero"
        for t, ref in zip(got, refs):
            torch.testing.assert_close(t, ref, atol=tol * (float(ref.abs().max()) + 1e-12), rtol=0)
        live = [i for i in range(n) if i not in ZERO_STAY]
        torch.testing.assert_close(got[0][live].norm(dim=1), torch.ones(len(live), dtype=torch.float64),
                                   atol=10 * tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_primitives_match_reference(backend, device, dtype):
    """The sparse primitives of the backend contract (backends/base.py) equal the dense reference ones; duplicate
    ids within a row add up, latents that never occur get zero rows."""
    g = torch.Generator().manual_seed(13)
    B, k, n, d = 9, 6, 40, 19
    idx = torch.randint(0, n // 2, (B, k), generator=g)
    idx[0] = idx[0, 0]  # a row of one id repeated
    coef, W, X = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, k), (n, d), (B, d)))
    ours = [t.to(device=device, dtype=dtype) for t in (coef, W, X)]
    c64, W64, X64 = (t.cpu().double() for t in ours)  # the same inputs, rounded to dtype
    tol = tolerance(dtype, backend) * 5
    impl, call, idx_d = get_backend(backend), in_native_dtype, idx.to(device)
    cases = {  # name: (backend outputs, reference outputs)
        "gather_accumulate": ((call(impl.gather_accumulate, ours[0], idx_d, ours[1]),),
                              (reference.gather_accumulate(c64, idx, W64),)),
        "transpose_reduce": (call(impl.transpose_reduce, ours[0], idx_d, ours[2], n),
                             reference.transpose_reduce(c64, idx, X64, n)),
        "sddmm": ((call(impl.sddmm, ours[2], idx_d, ours[1]),),
                  (reference.sddmm(X64, idx, W64),)),
    }
    for name, (outs, refs) in cases.items():
        for out, ref in zip(outs, refs, strict=True):
            assert out.dtype == dtype and out.shape == ref.shape, name
            torch.testing.assert_close(out.cpu().double(), ref, atol=tol * (float(ref.abs().max()) + 1), rtol=0,
                                       msg=lambda m, name=name: f"{name}: {m}")
    unused = torch.bincount(idx.reshape(-1), minlength=n) == 0
    assert bool((cases["transpose_reduce"][0][0].cpu()[unused] == 0).all())


def test_reference_decoder_norm_step_is_adam_on_projected_grads():
    """The oracle itself: identical to torch.optim.Adam fed projected gradients, then row renormalisation."""
    g = torch.Generator().manual_seed(1)
    W = torch.nn.functional.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=1)
    p = W.clone().requires_grad_()
    opt = torch.optim.Adam([p], lr=3e-2, betas=(0.9, 0.999), eps=1e-8)
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    for step in range(1, 5):
        grad = torch.randn(8, 5, generator=g, dtype=torch.float64)
        p.grad = reference.project_out_parallel(grad, p.detach())
        opt.step()
        with torch.no_grad():
            p.copy_(reference.normalize_rows(p))
        reference.decoder_norm_step(W, grad, m, v, step, 3e-2, (0.9, 0.999), 1e-8)
    torch.testing.assert_close(W, p.detach(), atol=1e-12, rtol=0)


def test_compile_fullgraph_training_step(backend, device, tmp_path, monkeypatch):
    """The ops trace into one graph and the compiled step computes what eager does."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no stale graphs from older op schemas
    if device.type == "cpu" and backend == "triton":
        pytest.skip("triton under the CPU interpreter cannot be compiled by inductor; covered on CUDA")
    x, W_enc, b_enc, W_dec, b_dec = make_sae(16, 12, 40, torch.float32, device, seed=8)
    params = [t.requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]

    def loss_fn(x, W_enc, b_enc, W_dec, b_dec):
        values, indices = dlmscope.topk_encode(x, W_enc, b_enc, b_dec, 5, backend=backend)
        x_hat = dlmscope.sparse_decode(values, indices, W_dec, b_dec, backend=backend)
        return (x - x_hat).pow(2).sum(-1).mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    loss_c = compiled(x, *params)
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = loss_fn(x, *params)
    grads_e = torch.autograd.grad(loss_e, params)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def test_backends_agree_with_each_other():
    """All available backends pick the same latents on a tie-free problem and decode identically."""
    names = [b for b in dlmscope.available_backends() if backend_device(b) is not None]
    x, W_enc, b_enc, W_dec, b_dec = make_sae(32, 24, 96, torch.float64, "cpu", seed=21)
    results = {}
    for name in names:
        dev = backend_device(name)
        args = [t.to(dev).float() for t in (x, W_enc, b_enc, b_dec)]
        values, indices = dlmscope.topk_encode(*args, 8, backend=name)
        order = values.argsort(dim=1, descending=True)
        results[name] = (values.gather(1, order).cpu(), indices.gather(1, order).cpu())
    base_values, base_indices = results["torch"]
    for name, (values, indices) in results.items():
        torch.testing.assert_close(values, base_values, atol=1e-4, rtol=1e-4)
        assert torch.equal(indices, base_indices), f"{name} selected different latents than torch"


def test_backend_reports_itself():
    assert get_backend("torch").name == "torch"
    assert "torch" in dlmscope.available_backends()


@pytest.mark.parametrize("with_aux", [False, True])
def test_topk_encode_grouped_matches_reference(backend, device, with_aux):
    """Each segment is an independent top-k; the aux selection only picks masked latents; gradients agree."""
    sizes, ks, k_aux = [17, 30, 9], [3, 1, 9], [4, 6, 2]
    S, d, B = sum(sizes), 13, 7
    x, W_enc, b_enc, _, _ = make_sae(B, d, S, torch.float32, device, seed=31)
    b_dec = torch.zeros(d, device=device)
    mask = (torch.rand(S, generator=torch.Generator().manual_seed(2)) < 0.4).to(device) if with_aux else None
    params = [t.clone().requires_grad_() for t in (x, W_enc, b_enc)]
    codes = dlmscope.ops.topk_encode_grouped(*params, b_dec, ks, sizes, aux_mask=mask,
                                             k_aux=k_aux if with_aux else None, backend=backend)
    tol = tolerance(torch.float32, backend)
    start = col = acol = 0
    for g, (k, size) in enumerate(zip(ks, sizes)):
        v, i = codes.values[:, col:col + k], codes.indices[:, col:col + k]
        assert int(i.min()) >= start and int(i.max()) < start + size
        check_topk(v.detach(), i - start, x, W_enc[start:start + size], b_enc[start:start + size], b_dec, k, tol)
        if with_aux:
            va, ia = codes.aux_values[:, acol:acol + k_aux[g]], codes.aux_indices[:, acol:acol + k_aux[g]]
            b_masked = torch.where(mask[start:start + size], b_enc[start:start + size], torch.tensor(-1e30,
                                                                                                      device=device))
            check_topk(va.detach(), ia - start, x, W_enc[start:start + size], b_masked, b_dec, k_aux[g], tol)
            picked = mask[ia.reshape(-1)] | (va.reshape(-1) == 0)
            assert bool(picked.all()), "aux selection picked an unmasked latent with a non-zero value"
            acol += k_aux[g]
        start += size
        col += k
    # gradients: the op's backward vs autograd through the reference at the same selection
    all_v = torch.cat([codes.values, codes.aux_values], 1)
    all_i = torch.cat([codes.indices, codes.aux_indices], 1)
    weights = torch.randn_like(all_v)
    (all_v * weights).sum().backward()
    ref = [p.detach().cpu().double().requires_grad_() for p in params]
    pre = reference.pre_activations(ref[0], ref[1], ref[2], b_dec.cpu().double())
    selected = (all_v.detach() > 0).cpu()  # zero-padded aux slots carry no gradient, whatever their latent
    (torch.relu(pre.gather(1, all_i.cpu())) * selected * weights.cpu().double()).sum().backward()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad.cpu().double(), r.grad, atol=tol * (float(r.grad.abs().max()) + 1), rtol=0)


def test_topk_encode_grouped_bad_input():
    x, W = torch.randn(3, 4), torch.randn(10, 4)
    b, bd = torch.zeros(10), torch.zeros(4)
    with pytest.raises(ValueError, match=r"sizes sum to 9 but W_enc \[10, 4\] has 10 latents"):
        dlmscope.ops.topk_encode_grouped(x, W, b, bd, [2, 2], [4, 5], backend="torch")
    with pytest.raises(ValueError, match=r"segment 1: k must satisfy 1 <= k <= size \(5\), got k=6"):
        dlmscope.ops.topk_encode_grouped(x, W, b, bd, [2, 6], [5, 5], backend="torch")
    with pytest.raises(ValueError, match=r"aux_mask must be a bool tensor of shape \[10\]"):
        dlmscope.ops.topk_encode_grouped(x, W, b, bd, [2, 2], [5, 5], aux_mask=torch.ones(10), k_aux=[1, 1],
                                         backend="torch")
    with pytest.raises(ValueError, match=r"k_aux must give one value in \[0, size\] per segment"):
        dlmscope.ops.topk_encode_grouped(x, W, b, bd, [2, 2], [5, 5], aux_mask=torch.ones(10, dtype=torch.bool),
                                         k_aux=[1], backend="torch")
