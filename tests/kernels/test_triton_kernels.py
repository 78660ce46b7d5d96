"""The Triton kernels against the plain-PyTorch oracle (``dlmscope.reference``) in float64.

Runs on CUDA, or on CPU under the Triton interpreter (``make test`` sets ``TRITON_INTERPRET=1``); skipped
otherwise. Shapes are small (the interpreter runs every block op through NumPy) and chosen to hit the edges:
d not a power of two, k = 1, k = n, k not a power of two, rows with fewer than k positive pre-activations,
duplicate ids, unused latents, several d-tiles, several latent splits.
"""
from __future__ import annotations

import os

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if __name__ != "__main__" and not (_INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (the interpreter on CPU)",
                allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from dlmscope import kernels as K  # noqa: E402
from dlmscope import reference  # noqa: E402
from dlmscope.backends.triton_backend import TritonBackend  # noqa: E402

DEV = torch.device("cpu" if _INTERPRET else "cuda")
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) of a result against the float64 oracle computed from the same (rounded) inputs
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, g=None, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


def _close(actual, expected, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol * scale)


# ---- topk_encode ------------------------------------------------------------------------------------------
#: relative precision of a value returned in each dtype: one ulp (2^-mantissa bits)
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _encode_oracle(x, W, be, bd):
    """(relu(pre) in float64 from the kernel's rounded inputs, a per-row bound on the fp32 accumulation error)."""
    xc = (x - bd).double().cpu()  # same rounding of x - b_dec as the kernel's input
    W64, be64 = W.double().cpu(), be.double().cpu()
    pre = (xc @ W64.T + be64).clamp_min(0)
    terms = xc.abs() @ W64.abs().T + be64.abs()               # what the fp32 sum's rounding scales with
    acc = (x.shape[1] + 2) * 2.0 ** -23 * terms.max(1, keepdim=True).values
    return pre, acc


def _check_encode(x, W, be, bd, k, values, indices):
    """The guarantee of the fused encoder (dlmscope/kernels/topk_encode.py) against float64, exactly as stated:
    fp32 inputs (int64 keys) select the true top-k up to fp32 accumulation; 16-bit inputs (int32 keys keeping
    p = 23 - INDEX_BITS mantissa bits) select it up to values that agree in their kept bits and return values
    within one ulp of the output dtype; above fused_max_kp (the chunked GEMM + select route) the selection is
    exact for the GEMM rounded to the dtype, so both bounds grow by one ulp of the summed magnitudes."""
    from dlmscope.kernels._launch import KEY32_KEPT_BITS, encode_config, fused_max_kp, next_pow2

    B, n = x.shape[0], W.shape[0]
    dtype = x.dtype
    assert values.shape == (B, k) and indices.shape == (B, k)
    assert values.dtype == dtype and indices.dtype == torch.int64
    pre, acc = _encode_oracle(x, W, be, bd)
    idx = indices.cpu()
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    for r in range(B):
        assert len(set(idx[r].tolist())) == k, f"row {r}: repeated indices"
    if next_pow2(k) > fused_max_kp(dtype):
        # the chunked GEMM + select route: exact for relu(GEMM rounded to the dtype + b_enc) in fp32
        terms = (x - bd).double().cpu().abs() @ W.double().cpu().abs().T
        err = ULP[dtype] * terms.max(1, keepdim=True).values + acc
        at_idx = pre.gather(1, idx)
        assert bool(((values.double().cpu() - at_idx).abs() <= err + ULP[dtype] * at_idx).all())
        assert bool((pre.scatter(1, idx, -1.0) <= at_idx.min(1, keepdim=True).values + 2 * err).all())
        return
    bits = encode_config(x, n, k).INDEX_BITS
    if dtype == torch.float32:
        assert bits == 0                                      # int64 keys: no truncation
    else:
        assert 23 - bits >= KEY32_KEPT_BITS[dtype]
    trunc = 2.0 ** -(23 - bits) if bits else 0.0              # relative truncation of a 32-bit key's value
    at_idx = pre.gather(1, idx)
    got = values.double().cpu()
    # the values are the pre-activations at the returned indices, within one output ulp (+ accumulation)
    assert bool(((got - at_idx).abs() <= ULP[dtype] * at_idx + acc).all()), float((got - at_idx).abs().max())
    # every latent left out is no larger than the smallest kept one, up to the kept bits (+ accumulation)
    kept_min = at_idx.min(1, keepdim=True).values
    left = pre.scatter(1, idx, -1.0)
    assert bool((left <= kept_min * (1 + trunc) + 2 * acc).all())


@pytest.mark.parametrize("B,d,n,k,dtype", [
    (5, 20, 70, 3, torch.float32),      # tiny, one row block
    (37, 50, 300, 7, torch.float32),    # several row blocks and latent splits, ragged tails
    (20, 33, 100, 1, torch.bfloat16),   # k = 1
    (9, 24, 40, 40, torch.float16),     # k = n (padding keys never win)
    (17, 40, 300, 20, torch.float32),   # KP = 32 > 16
    (12, 19, 64, 16, torch.bfloat16),   # k a power of two, n = one tile
    (37, 50, 300, 7, torch.bfloat16),   # 32-bit keys over several splits, ragged tails
    (11, 21, 90, 90, torch.bfloat16),   # k = n with 32-bit keys
    (21, 30, 200, 12, torch.float16),
])
def test_topk_encode(B, d, n, k, dtype):
    g = _gen(B * 1000 + n)
    x, W = _randn(B, d, dtype=dtype, g=g), _randn(n, d, dtype=dtype, g=g)
    be, bd = _randn(n, dtype=dtype, g=g, scale=0.1), _randn(d, dtype=dtype, g=g, scale=0.1)
    values, indices = K.topk_encode(x, W, be, bd, k)
    _check_encode(x, W, be, bd, k, values, indices)


@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_encode_non_contiguous_input(dtype):
    g = _gen(31)
    B, d, n, k = 14, 22, 80, 5
    x = _randn(d, B, dtype=dtype, g=g).T                          # column-major rows
    assert not x.is_contiguous()
    W, be, bd = _randn(n, d, dtype=dtype, g=g), _randn(n, dtype=dtype, g=g), _randn(d, dtype=dtype, g=g)
    values, indices = K.topk_encode(x, W, be, bd, k)
    _check_encode(x, W, be, bd, k, values, indices)


@pytest.mark.parametrize("one_red", ["0", "1"])
def test_topk_encode_32bit_keys_wrap_safely(monkeypatch, one_red):
    """Huge values (fp32 bits above 2^30, so the pair sum of the one-reduction compare-and-swap overflows int32)
    and both compare-and-swap variants give the same, valid selection."""
    monkeypatch.setenv("DLMSCOPE_ENCODE_ONE_RED", one_red)
    g = _gen(41)
    B, d, n, k = 9, 16, 100, 6
    x, W = _randn(B, d, dtype=torch.bfloat16, g=g, scale=1e15), _randn(n, d, dtype=torch.bfloat16, g=g, scale=1e15)
    be, bd = torch.zeros(n, dtype=torch.bfloat16, device=DEV), torch.zeros(d, dtype=torch.bfloat16, device=DEV)
    values, indices = K.topk_encode(x, W, be, bd, k)
    _check_encode(x, W, be, bd, k, values, indices)
    assert float(values.float().max()) > 1e29


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_encode_32bit_keys_agree_in_kept_bits(dtype):
    """Values that differ only below the kept bits tie: the lower split-local index wins. pre_j = 1 + j * 2^-(p+2)
    (exact in fp32, bf16/fp16 inputs), so every 4 consecutive latents share their kept bits: the top-3 is
    {60, 61, 62}, not the float64 top-3 {61, 62, 63} - which the guarantee allows."""
    from dlmscope.kernels._launch import encode_config

    n, d, k = 64, 2, 3
    p = 23 - encode_config(torch.empty(1, d, dtype=dtype), n, k).INDEX_BITS
    x = torch.tensor([[1.0, 2.0 ** -(p + 2)]] * 3, dtype=dtype, device=DEV)
    W = torch.stack([torch.ones(n), torch.arange(n, dtype=torch.float32)], 1).to(dtype).to(DEV)
    be, bd = torch.zeros(n, dtype=dtype, device=DEV), torch.zeros(d, dtype=dtype, device=DEV)
    values, indices = K.topk_encode(x, W, be, bd, k)
    _check_encode(x, W, be, bd, k, values, indices)
    assert indices.sort(1).values.tolist() == [[60, 61, 62]] * 3


def test_topk_encode_key_width_override(monkeypatch):
    """DLMSCOPE_ENCODE_KEYS=64 gives bf16 the exact int64 keys; =32 gives fp32 the 32-bit ones; others fail."""
    from dlmscope.kernels._launch import encode_config

    g = _gen(43)
    x, W = _randn(6, 12, dtype=torch.bfloat16, g=g), _randn(50, 12, dtype=torch.bfloat16, g=g)
    be, bd = _randn(50, dtype=torch.bfloat16, g=g), _randn(12, dtype=torch.bfloat16, g=g)
    monkeypatch.setenv("DLMSCOPE_ENCODE_KEYS", "64")
    assert encode_config(x, 50, 4).INDEX_BITS == 0
    values, indices = K.topk_encode(x, W, be, bd, 4)
    _check_encode(x, W, be, bd, 4, values, indices)
    monkeypatch.setenv("DLMSCOPE_ENCODE_KEYS", "32")
    assert encode_config(x.float(), 50, 4).INDEX_BITS > 0
    monkeypatch.setenv("DLMSCOPE_ENCODE_KEYS", "16")
    with pytest.raises(ValueError, match="DLMSCOPE_ENCODE_KEYS"):
        encode_config(x, 50, 4)


@pytest.mark.parametrize("dtype,max_bits", [(torch.bfloat16, 15), (torch.float16, 12)])
def test_encode_config_bounds_split_for_32bit_keys(dtype, max_bits):
    """Splits are cut so a split-local index fits in INDEX_BITS <= 23 - kept bits, and they cover n."""
    from dlmscope.kernels._launch import encode_config

    for n in (70, 4096, 1 << 16, 100_003):
        cfg = encode_config(torch.empty(4, 8, dtype=dtype), n, 10)
        assert 1 <= cfg.INDEX_BITS <= max_bits and min(n, cfg.n_per_split) <= 1 << cfg.INDEX_BITS
        assert cfg.splits * cfg.n_per_split >= n > (cfg.splits - 1) * cfg.n_per_split


@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_encode_fewer_positives_than_k(dtype):
    """Rows with < k positive pre-activations: all positives kept, zeros padded at distinct indices."""
    g = _gen(7)
    B, d, n, k = 6, 24, 90, 10
    x, W = _randn(B, d, dtype=dtype, g=g), _randn(n, d, dtype=dtype, g=g)
    be = torch.full((n,), -1e3, dtype=dtype, device=DEV)
    be[torch.tensor([3, 17, 50, 88])] = 1e3  # exactly 4 positive latents per row
    x[0] = 0.0  # row 0 still has these 4; make one row have none at all
    be_none = torch.full((n,), -1.0, dtype=dtype, device=DEV)
    bd = torch.zeros(d, dtype=dtype, device=DEV)
    values, indices = K.topk_encode(x, W, be, bd, k)
    _check_encode(x, W, be, bd, k, values, indices)
    for r in range(B):
        row = dict(zip(indices[r].tolist(), values[r].tolist()))
        assert {3, 17, 50, 88} <= set(row)
        assert sorted(v for v in row.values() if v > 0) == sorted(row[i] for i in (3, 17, 50, 88))
        assert sum(v == 0.0 for v in row.values()) == k - 4
    values, indices = K.topk_encode(torch.zeros_like(x), W, be_none, bd, k)
    assert bool((values == 0).all())
    assert all(len(set(r)) == k for r in indices.tolist())


@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_encode_ties_prefer_lower_index(dtype):
    from dlmscope.kernels._launch import encode_config

    B, d, n, k = 3, 16, 50, 4
    x = torch.zeros(B, d, dtype=dtype, device=DEV)
    W = torch.zeros(n, d, dtype=dtype, device=DEV)
    be = torch.ones(n, dtype=dtype, device=DEV)  # every latent ties at 1.0
    values, indices = K.topk_encode(x, W, be, torch.zeros(d, dtype=dtype, device=DEV), k)
    assert bool((values == 1).all())
    cfg = encode_config(x, n, k)
    if cfg.INDEX_BITS:  # 32-bit keys hold split-local indices: the lower index wins within each split
        assert cfg.splits > 1 and bool(((indices % cfg.n_per_split) < k).all())
        assert all(len(set(r)) == k for r in indices.tolist())
    else:
        assert indices.sort(1).values.tolist() == [[0, 1, 2, 3]] * B


@pytest.mark.parametrize("k,dtype", [(130, torch.float32), (130, torch.bfloat16), (300, torch.float16)])
def test_topk_encode_large_k(k, dtype):
    """k = 130 -> KP = 256 (the wide-tile path); fp16 k = 300 -> KP = 512, the largest fused KP of 16-bit."""
    g = _gen(11)
    B, d, n = 5, 18, 600
    x, W = _randn(B, d, dtype=dtype, g=g), _randn(n, d, dtype=dtype, g=g)
    be, bd = _randn(n, dtype=dtype, g=g, scale=0.1), _randn(d, dtype=dtype, g=g, scale=0.1)
    values, indices = K.topk_encode(x, W, be, bd, k)
    _check_encode(x, W, be, bd, k, values, indices)


@pytest.mark.parametrize("dtype,k", [(torch.float32, 820), (torch.bfloat16, 820), (torch.float32, 300)])
def test_topk_encode_large_k_routes_to_select(monkeypatch, dtype, k):
    """The paper's largest k (KP = 1024) and fp32 KP = 512: above fused_max_kp, topk_encode is the chunked GEMM +
    threshold-then-compact select (several chunks here: SELECT_CHUNK shrunk to k)."""
    import importlib

    encode_mod = importlib.import_module("dlmscope.kernels.topk_encode")  # the module (the package exports the function)
    monkeypatch.setattr(encode_mod, "SELECT_CHUNK", 1)     # chunks of k latents: 2 chunks and a merge
    g = _gen(12)
    B, d, n = 4, 16, 1100
    x, W = _randn(B, d, dtype=dtype, g=g), _randn(n, d, dtype=dtype, g=g)
    be, bd = _randn(n, dtype=dtype, g=g, scale=0.1), _randn(d, dtype=dtype, g=g, scale=0.1)
    values, indices = K.topk_encode(x, W, be, bd, k)
    _check_encode(x, W, be, bd, k, values, indices)


# ---- sparse row primitives --------------------------------------------------------------------------------
def _sparse_inputs(B, k, n, d, dtype, seed, dup=True):
    g = _gen(seed)
    idx = torch.randint(0, n, (B, k), generator=g)
    if dup and k >= 2:
        idx[0, 1] = idx[0, 0]  # a duplicate id within a row
    return (_randn(B, k, dtype=dtype, g=g), idx.to(DEV), _randn(n, d, dtype=dtype, g=g),
            _randn(B, d, dtype=dtype, g=g))


SPARSE_SHAPES = [  # B, k, n, d
    (13, 5, 40, 37),
    (7, 1, 9, 100),     # k = 1, two d-tiles under the interpreter
    (6, 12, 12, 70),    # k = n
    (20, 33, 17, 5),    # many entries per latent (several BLOCK_E steps), k > BLOCK_K
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,k,n,d", SPARSE_SHAPES)
def test_gather_accumulate(B, k, n, d, dtype):
    coef, idx, W, _ = _sparse_inputs(B, k, n, d, dtype, seed=B + k + n + d)
    out = K.gather_accumulate(coef, idx, W)
    assert out.shape == (B, d) and out.dtype == dtype
    ref = reference.gather_accumulate(coef.double().cpu(), idx.cpu(), W.double().cpu())
    _close(out, ref, dtype, scale=k ** 0.5)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,k,n,d", SPARSE_SHAPES)
def test_sddmm(B, k, n, d, dtype):
    _, idx, W, G = _sparse_inputs(B, k, n, d, dtype, seed=2 * (B + k + n + d))
    out = K.sddmm(G, idx, W)
    assert out.shape == (B, k) and out.dtype == dtype
    ref = reference.sddmm(G.double().cpu(), idx.cpu(), W.double().cpu())
    _close(out, ref, dtype, scale=d ** 0.5)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,k,n,d", SPARSE_SHAPES + [(4, 3, 50, 20)])  # last: mostly unused latents
def test_transpose_reduce(B, k, n, d, dtype):
    coef, idx, _, X = _sparse_inputs(B, k, n, d, dtype, seed=3 * (B + k + n + d))
    out, coef_sum = K.transpose_reduce(coef, idx, X, n)
    assert out.shape == (n, d) and out.dtype == dtype and coef_sum.shape == (n,) and coef_sum.dtype == dtype
    ref, ref_sum = reference.transpose_reduce(coef.double().cpu(), idx.cpu(), X.double().cpu(), n)
    cnt = torch.bincount(idx.cpu().reshape(-1), minlength=n)
    _close(out, ref, dtype, scale=float(cnt.max()) ** 0.5)
    _close(coef_sum, ref_sum, dtype, scale=float(cnt.max()) ** 0.5)
    unused = cnt == 0
    assert bool((out.cpu()[unused] == 0).all()) and bool((coef_sum.cpu()[unused] == 0).all())
    # deterministic: a second run is bitwise identical (even though torch.empty gave fresh memory)
    out2, coef_sum2 = K.transpose_reduce(coef, idx, X, n)
    assert torch.equal(out, out2) and torch.equal(coef_sum, coef_sum2)


def test_sort_by_latent():
    idx = torch.tensor([[3, 1], [1, 0], [3, 3]], device=DEV)
    perm, starts = K.sort_by_latent(idx, 5)
    assert perm.tolist() == [3, 1, 2, 0, 4, 5]
    assert starts.tolist() == [0, 1, 3, 3, 6, 6]


# ---- decoder_norm_step ------------------------------------------------------------------------------------
def _oracle_norm_step(W, grad, m, v, step, lr, b1, b2, eps):
    """reference.decoder_norm_step in float64 on copies: (W, m, v) after the step."""
    W, grad, m, v = (t.double().cpu().clone() for t in (W, grad, m, v))
    reference.decoder_norm_step(W, grad, m, v, step, lr, (b1, b2), eps)
    return W, m, v


@pytest.mark.parametrize("n,d", [(7, 50), (5, 200)])  # one block per row / several d-tiles per row
@pytest.mark.parametrize("dtype", FLOATS)
def test_decoder_norm_step(n, d, dtype):
    g = _gen(n * d)
    W = _randn(n, d, dtype=dtype, g=g)
    W = (W.double() / W.double().norm(dim=1, keepdim=True)).to(dtype)
    grad = _randn(n, d, dtype=dtype, g=g, scale=0.1)  # magnitudes that stay normal in float16
    m = _randn(n, d, dtype=dtype, g=g, scale=1e-2)
    v = _randn(n, d, dtype=dtype, g=g, scale=0.05) ** 2
    grad0 = grad.clone()
    args = (5, 1e-2, 0.9, 0.999, 1e-8)
    W_ref, m_ref, v_ref = _oracle_norm_step(W, grad, m, v, *args)
    K.decoder_norm_step(W, grad, m, v, *args)
    assert torch.equal(grad, grad0), "grad must not be modified"
    _close(W, W_ref, dtype)
    _close(m, m_ref, dtype, scale=1e-2)
    _close(v, v_ref, dtype, scale=1e-3)
    norms = W.double().norm(dim=1)
    _close(norms, torch.ones_like(norms), dtype)


@pytest.mark.parametrize("n,d", [(6, 50), (6, 200)])  # one block per row / several d-tiles per row
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_norm_step_zero_rows(n, d, dtype):
    """Zero rows of W (reference.py's definition): row 0 (zero grad, zero moments) stays exactly zero, row 2
    (nonzero grad) becomes a unit row, the rest are ordinary; no NaN/Inf, all equal to the oracle."""
    g = _gen(n + d)
    W = _randn(n, d, dtype=dtype, g=g)
    W = (W.double() / W.double().norm(dim=1, keepdim=True)).to(dtype)
    grad = _randn(n, d, dtype=dtype, g=g, scale=0.1)
    m = _randn(n, d, dtype=dtype, g=g, scale=1e-2)
    v = _randn(n, d, dtype=dtype, g=g, scale=0.05) ** 2
    W[[0, 2]] = 0
    grad[0] = 0
    m[[0, 2]] = 0
    v[[0, 2]] = 0
    args = (1, 1e-2, 0.9, 0.999, 1e-8)
    W_ref, m_ref, v_ref = _oracle_norm_step(W, grad, m, v, *args)
    K.decoder_norm_step(W, grad, m, v, *args)
    for t in (W, m, v):
        assert bool(t.isfinite().all()) and bool((t[0] == 0).all())
    _close(W, W_ref, dtype)
    _close(m, m_ref, dtype, scale=1e-2)
    _close(v, v_ref, dtype, scale=1e-3)
    norms = W[1:].double().norm(dim=1)
    _close(norms, torch.ones_like(norms), dtype)


def test_decoder_norm_step_matches_torch_adam():
    """float32 over three steps against torch.optim.Adam on the projected gradient, tightly."""
    g = _gen(5)
    n, d = 6, 45
    W = _randn(n, d, g=g)
    W = W / W.norm(dim=1, keepdim=True)
    p = torch.nn.Parameter(W.clone())
    opt = torch.optim.Adam([p], lr=3e-3, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    for step in range(1, 4):
        grad = _randn(n, d, g=g)
        with torch.no_grad():
            w_hat = p / p.norm(dim=1, keepdim=True)
            p.grad = grad - (grad * w_hat).sum(1, keepdim=True) * w_hat
        opt.step()
        with torch.no_grad():
            p.div_(p.norm(dim=1, keepdim=True))
        K.decoder_norm_step(W, grad, m, v, step, 3e-3, 0.9, 0.999, 1e-8)
        torch.testing.assert_close(W, p.detach(), rtol=2e-6, atol=2e-6)
        state = opt.state[p]
        torch.testing.assert_close(m, state["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-5, atol=1e-9)


# ---- the backend --------------------------------------------------------------------------------------------
def test_backend_contract():
    be = TritonBackend()
    assert be.name == "triton" and be.is_available() and be.supports(DEV)
    assert torch.float64 not in be.native_dtypes
    g = _gen(21)
    B, d, n, k = 9, 30, 60, 4
    x, W_enc, W_dec = _randn(B, d, g=g), _randn(n, d, g=g), _randn(n, d, g=g)
    b_enc, b_dec = _randn(n, g=g, scale=0.1), _randn(d, g=g, scale=0.1)
    values, indices = be.encode(x, W_enc, b_enc, b_dec, k)
    _check_encode(x, W_enc, b_enc, b_dec, k, values, indices)
    x_hat = be.decode(values, indices, W_dec, b_dec)
    ref = reference.sparse_decode(values.double().cpu(), indices.cpu(), W_dec.double().cpu(), b_dec.double().cpu())
    _close(x_hat, ref, torch.float32, scale=3.0)
    gy = _randn(B, d, g=g)
    d_values, dW_dec, db_dec = be.decode_backward(gy, values, indices, W_dec)
    _close(d_values, reference.sddmm(gy.double().cpu(), indices.cpu(), W_dec.double().cpu()), torch.float32,
           scale=6.0)
    assert dW_dec.shape == W_dec.shape and db_dec.shape == (d,)


# ---- ahead-of-time build for the target GPU (no GPU needed) -------------------------------------------------
@pytest.mark.slow
def test_kernels_build_for_sm90():
    """Every kernel, at the CUDA configs of ``_launch``, compiles for sm_90 (H100) through ptxas.

    Runs in a subprocess without TRITON_INTERPRET (under it ``triton.jit`` gives interpreter functions).
    """
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(K.__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, __file__, "--build-sm90"], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _build_sm90() -> int:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(mod, kernel, sig, const, num_warps, num_stages=3):
        fn = getattr(importlib.import_module("dlmscope.kernels." + mod), kernel)
        sig = {**sig, **{c: "constexpr" for c in const}}
        src = ASTSource(fn=fn, signature={a: sig[a] for a in fn.arg_names}, constexprs=const)
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        except (FileNotFoundError, PermissionError, RuntimeError) as exc:  # no usable ptxas here
            if "ptxas" in str(exc):
                print(f"no usable ptxas: {exc}")
                raise SystemExit(77)
            raise

    dt = "bf16"
    enc_sig = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", cand_ptr="*i32", B="i32", N="i32", D="i32",
                   n_per_split="i32", num_splits="i32", stride_xb="i32", stride_wn="i32")
    build("topk_encode", "_topk_encode_kernel", enc_sig,
          dict(KP=64, BLOCK_B=64, BLOCK_N=128, BLOCK_D=32, GROUP_B=8, INPUT_PRECISION="tf32", DOT_FP32=False,
               LOG_B=6, LOG_N=7, LOG_K=6, INDEX_BITS=15, ONE_RED=True), 8)
    build("topk_select", "_topk_select_kernel",
          dict(pre_ptr=f"*{dt}", bias_ptr=f"*{dt}", val_ptr="*fp32", idx_ptr="*i64", C="i32", k="i32",
               id_offset="i32", stride_pre="i32", stride_val="i32", stride_idx="i32"),
          dict(HAS_BIAS=True, BLOCK_C=4096, RADIX=8, PASSES=4), 8, 1)
    build("gather_accumulate", "_gather_accumulate_kernel",
          dict(coef_ptr=f"*{dt}", idx_ptr="*i64", w_ptr=f"*{dt}", out_ptr=f"*{dt}", K="i32", D="i32",
               stride_w="i32", stride_out="i32"), dict(BLOCK_K=32, BLOCK_D=512), 8)
    build("sddmm", "_sddmm_kernel",
          dict(g_ptr=f"*{dt}", idx_ptr="*i64", w_ptr=f"*{dt}", out_ptr=f"*{dt}", K="i32", D="i32",
               stride_g="i32", stride_w="i32"), dict(BLOCK_K=32, BLOCK_D=128), 4)
    build("transpose_reduce", "_pieces_kernel",
          dict(coef_ptr=f"*{dt}", perm_ptr="*i64", starts_ptr="*i64", item_lat_ptr="*i64", first_item_ptr="*i64",
               pieces_ptr="*i64", slot_ptr="*i64", x_ptr=f"*{dt}", out_ptr=f"*{dt}", csum_ptr=f"*{dt}",
               part_ptr="*fp32", part_csum_ptr="*fp32", N="i32", K="i32", D="i32", stride_x="i32",
               stride_out="i32", PIECE="i32"),
          dict(BLOCK_E=16, BLOCK_D=512), 8)
    build("transpose_reduce", "_sum_pieces_kernel",
          dict(split_lat_ptr="*i64", pieces_ptr="*i64", slot_ptr="*i64", part_ptr="*fp32", part_csum_ptr="*fp32",
               out_ptr=f"*{dt}", csum_ptr=f"*{dt}", N="i32", D="i32", stride_out="i32"),
          dict(BLOCK_D=512), 4)
    norm_sig = dict(w_ptr="*fp32", g_ptr="*fp32", m_ptr="*fp32", v_ptr="*fp32", D="i32", stride_w="i32",
                    stride_g="i32", stride_m="i32", stride_v="i32", one_m_b1="fp32", beta2="fp32",
                    one_m_b2="fp32", step_size="fp32", sqrt_bc2="fp32", eps="fp32")
    build("decoder_norm", "_decoder_norm_kernel", norm_sig, dict(BLOCK_D=4096, SINGLE=True), 8, 1)
    build("decoder_norm", "_decoder_norm_kernel", norm_sig, dict(BLOCK_D=2048, SINGLE=False), 4, 1)
    return 0


if __name__ == "__main__":
    import sys

    if "--build-sm90" in sys.argv:
        sys.exit(_build_sm90())
