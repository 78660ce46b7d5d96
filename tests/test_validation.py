"""Bad input raises TypeError/ValueError naming the argument and the shapes; backend selection rules."""
from __future__ import annotations

import pytest
import torch

import dlmscope
from dlmscope import reference
from dlmscope.backends import ENV_VAR, resolve_backend

from tests.helpers.saes import make_sae


@pytest.fixture
def sae():
    torch.manual_seed(0)
    d, n = 8, 20
    return dict(x=torch.randn(4, d), W_enc=torch.randn(n, d), b_enc=torch.zeros(n), b_dec=torch.zeros(d),
                W_dec=torch.randn(n, d))


def encode(s, **over):
    a = {**s, **over}
    return dlmscope.topk_encode(a["x"], a["W_enc"], a["b_enc"], a["b_dec"], a.get("k", 3), backend="torch")


@pytest.mark.parametrize(
    "override, error, pattern",
    [
        (dict(x=torch.randn(4, 7)), ValueError, r"x has shape \[4, 7\].*W_enc \[20, 8\].*d=8"),
        (dict(b_enc=torch.zeros(19)), ValueError, r"b_enc must have shape \[n\] = \[20\].*got \[19\]"),
        (dict(b_dec=torch.zeros(9)), ValueError, r"b_dec must have shape \[d\] = \[8\].*got \[9\]"),
        (dict(W_enc=torch.randn(20, 8, 1)), ValueError, r"W_enc must be \[n, d\], got shape \[20, 8, 1\]"),
        (dict(k=0), ValueError, r"k must satisfy 1 <= k <= n \(number of latents = 20\), got k=0"),
        (dict(k=21), ValueError, r"k=21"),
        (dict(k=2.0), TypeError, r"k must be an int"),
        (dict(k=True), TypeError, r"k must be an int"),
        (dict(x=torch.randint(0, 3, (4, 8))), TypeError, r"x must be float32, float64, bfloat16 or float16"),
        (dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, r"W_enc has dtype torch.float32 but x has "
                                                                    r"torch.float64"),
        (dict(x=torch.randn(0, 8)), ValueError, r"x \[0, 8\] is an empty batch"),
        (dict(x=torch.tensor([[1.0] * 7 + [float("nan")]] * 4)), ValueError, r"x \[4, 8\] contains NaN or Inf "
                                                                             r"\(first at index \(0, 7\)\)"),
        (dict(x=torch.tensor([[float("inf")] * 8] * 4)), ValueError, r"contains NaN or Inf"),
        (dict(W_enc=[[1.0]]), TypeError, r"W_enc must be a torch.Tensor, got list"),
    ],
)
def test_topk_encode_bad_input(sae, override, error, pattern):
    with pytest.raises(error, match=pattern):
        encode(sae, **override)


def test_device_mismatch_is_named(sae):
    with pytest.raises(ValueError, match=r"W_enc is on meta but x is on cpu"):
        encode(sae, W_enc=torch.empty(20, 8, device="meta"))


def test_value_checks_can_be_switched_off(sae):
    x = sae["x"].clone()
    x[0, 0] = float("nan")
    with dlmscope.value_checks(False):
        encode(sae, x=x)  # no host sync, no error: the caller takes responsibility
    with pytest.raises(ValueError):
        encode(sae, x=x)


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (lambda s: (torch.rand(4, 3), torch.tensor([[0, 1, 20]] * 4)), ValueError,
         r"indices must lie in \[0, n\) = \[0, 20\).*got values in \[0, 20\]"),
        (lambda s: (torch.rand(4, 3), torch.tensor([[0, -1, 2]] * 4)), ValueError, r"got values in \[-1, 2\]"),
        (lambda s: (torch.rand(4, 3), torch.rand(4, 3)), TypeError, r"indices must be int64 or int32, got "
                                                                     r"torch.float32"),
        (lambda s: (torch.rand(4, 3), torch.zeros(4, 2, dtype=torch.long)), ValueError,
         r"values \[4, 3\] and indices \[4, 2\] must have the same shape"),
        (lambda s: (torch.rand(0, 3), torch.zeros(0, 3, dtype=torch.long)), ValueError, r"empty batch"),
        (lambda s: (torch.rand(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.long)), TypeError,
         r"W_dec has dtype torch.float32 but values has torch.float64"),
    ],
)
def test_sparse_decode_bad_input(sae, make, error, pattern):
    values, indices = make(sae)
    with pytest.raises(error, match=pattern):
        dlmscope.sparse_decode(values, indices, sae["W_dec"], sae["b_dec"], backend="torch")


def test_sparse_decode_bad_bias(sae):
    with pytest.raises(ValueError, match=r"b_dec must have shape \[d\] = \[8\] to match W_dec \[20, 8\]"):
        dlmscope.sparse_decode(torch.rand(4, 3), torch.zeros(4, 3, dtype=torch.long), sae["W_dec"],
                               torch.zeros(5), backend="torch")


@pytest.mark.parametrize(
    "over, error, pattern",
    [
        (dict(grad=torch.randn(20, 7)), ValueError, r"grad has shape \[20, 7\] but W_dec has \[20, 8\]"),
        (dict(step=0), ValueError, r"step must be an int >= 1"),
        (dict(lr=-1.0), ValueError, r"lr must be >= 0"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas must lie in \[0, 1\)"),
        (dict(eps=0.0), ValueError, r"eps must be > 0"),
        (dict(exp_avg=torch.zeros(20, 8, dtype=torch.float64)), TypeError, r"exp_avg has dtype torch.float64"),
        (dict(exp_avg=torch.zeros(8, 20).T), ValueError, r"exp_avg must be contiguous"),
        (dict(grad=torch.full((20, 8), float("nan"))), ValueError, r"grad \[20, 8\] contains NaN"),
    ],
)
def test_decoder_norm_step_bad_input(sae, over, error, pattern):
    W = torch.nn.functional.normalize(sae["W_dec"], dim=1)
    a = dict(W_dec=W, grad=torch.randn(20, 8), exp_avg=torch.zeros(20, 8), exp_avg_sq=torch.zeros(20, 8), step=1,
             lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    a.update(over)
    with pytest.raises(error, match=pattern):
        dlmscope.decoder_norm_step(**a, backend="torch")


def test_unknown_backend_is_named(sae):
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'"):
        dlmscope.topk_encode(sae["x"], sae["W_enc"], sae["b_enc"], sae["b_dec"], 3, backend="tpu")


def test_backend_selection_order(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    default = resolve_backend(None, cpu).name
    assert default == ("cpu" if "cpu" in dlmscope.available_backends() else "torch")
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend(None, cpu).name == "torch"  # env beats the default
    if "cpu" in dlmscope.available_backends():
        assert resolve_backend("cpu", cpu).name == "cpu"  # argument beats env
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=r"unknown backend 'nonsense'"):
        resolve_backend(None, cpu)


def test_backend_that_cannot_run_on_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available() or "triton" not in dlmscope.available_backends():
        pytest.skip("needs triton installed and no GPU")
    with pytest.raises(ValueError, match=r"'triton' cannot run on device cpu"):
        resolve_backend("triton", torch.device("cpu"))


# ---- issue 21.10: NaN / Inf in an SAE's weights ----------------------------------------------------------------


def _poison(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("arg", ["x", "W_enc", "b_enc", "b_dec"])
def test_21_10_non_finite_encoder_input_or_weight_raises(backend, device, arg, value):
    """With value checks on, every backend refuses NaN/Inf in any input of the encoder, naming it (the cpu backend
    used to never select a NaN latent while torch selected it first)."""
    x, W_enc, b_enc, _, b_dec = make_sae(4, 8, 20, torch.float32, device, seed=1)
    args = dict(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)
    args[arg] = _poison(args[arg], value)
    with pytest.raises(ValueError, match=rf"^{arg} \[[0-9, ]+\] contains NaN or Inf \(first at index"):
        dlmscope.topk_encode(**args, k=3, backend=backend)
    with pytest.raises(ValueError, match=rf"^{arg} \[[0-9, ]+\] contains NaN or Inf"):
        dlmscope.ops.topk_encode_grouped(*args.values(), [2, 1], [12, 8], backend=backend)


def test_21_10_non_finite_decoder_bias_raises(backend, device):
    W_dec, b_dec = torch.randn(20, 8, device=device), _poison(torch.zeros(8, device=device), float("nan"))
    with pytest.raises(ValueError, match=r"^b_dec \[8\] contains NaN or Inf \(first at index \(4,\)\)"):
        dlmscope.sparse_decode(torch.rand(4, 3, device=device), torch.zeros(4, 3, dtype=torch.long, device=device),
                               W_dec, b_dec, backend=backend)


def test_21_10_nan_with_value_checks_off_is_as_documented(backend, device):
    """Without value checks (ops module docstring): torch and chunked select a NaN pre-activation first, cpu and
    triton never select it, so a NaN b_dec gives all-NaN values on the former and all-zero values on the latter."""
    x, W_enc, b_enc, _, b_dec = make_sae(4, 8, 20, torch.float32, device, seed=1)
    with dlmscope.value_checks(False):
        values, _ = dlmscope.topk_encode(x, W_enc, b_enc, _poison(b_dec, float("nan")), 3, backend=backend)
    if backend in ("torch", "chunked"):
        assert bool(values.isnan().all())
    elif backend in ("cpu", "triton"):
        assert bool((values == 0).all())


# ---- issue 21.14: op edge cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_21_14_sparse_decode_k0_gives_the_bias_on_every_backend(backend, device, lead):
    """k = 0 latents per row: x_hat = b_dec with the leading shape kept; d_values is empty, dW_dec zero, db_dec the
    sum of the incoming gradient — as the reference computes."""
    g = torch.Generator().manual_seed(0)
    values = torch.rand(*lead, 0, generator=g).to(device).requires_grad_()
    indices = torch.zeros(*lead, 0, dtype=torch.long, device=device)
    W_dec = torch.randn(10, 6, generator=g).to(device).requires_grad_()
    b_dec = torch.randn(6, generator=g).to(device).requires_grad_()
    out = dlmscope.sparse_decode(values, indices, W_dec, b_dec, backend=backend)
    assert out.shape == (*lead, 6)
    upstream = torch.randn(*lead, 6, generator=g).to(device)
    (out * upstream).sum().backward()
    ref_params = [t.detach().cpu().double().requires_grad_() for t in (values, W_dec, b_dec)]
    B = values.shape[:-1].numel()
    ref = reference.sparse_decode(ref_params[0].reshape(B, 0), indices.cpu().reshape(B, 0), *ref_params[1:])
    (ref * upstream.cpu().double().reshape(B, 6)).sum().backward()
    torch.testing.assert_close(out.detach().cpu().double().reshape(B, 6), ref.detach(), atol=1e-6, rtol=0)
    assert values.grad.shape == values.shape
    for p, r in zip((W_dec, b_dec), ref_params[1:]):
        torch.testing.assert_close(p.grad.cpu().double(), r.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("over, pattern", [
    (dict(ks=[2.7, 8.9]), r"ks must be a sequence of ints, got \[2\.7, 8\.9\]"),
    (dict(ks=[2.0, 3]), r"ks must be a sequence of ints, got \[2\.0, 3\]"),
    (dict(ks=[True, 3]), r"ks must be a sequence of ints, got \[True, 3\]"),
    (dict(ks="23"), r"ks must be a sequence of ints, got '23'"),
    (dict(ks=3), r"ks must be a sequence of ints, got 3"),
    (dict(sizes=[4.0, 6]), r"sizes must be a sequence of ints, got \[4\.0, 6\]"),
    (dict(k_aux=[1, 1.5]), r"k_aux must be a sequence of ints, got \[1, 1\.5\]"),
])
def test_21_14_grouped_refuses_non_integer_ks(over, pattern):
    x, W, b, bd = torch.randn(3, 4), torch.randn(10, 4), torch.zeros(10), torch.zeros(4)
    args = dict(ks=[2, 3], sizes=[4, 6], aux_mask=torch.ones(10, dtype=torch.bool), k_aux=[1, 1])
    args.update(over)
    with pytest.raises(ValueError, match=pattern):
        dlmscope.ops.topk_encode_grouped(x, W, b, bd, args.pop("ks"), args.pop("sizes"), **args, backend="torch")


def _step_args(**over):
    g = torch.Generator().manual_seed(3)
    W = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    a = dict(W_dec=W, grad=torch.randn(20, 8, generator=g), exp_avg=torch.zeros(20, 8), exp_avg_sq=torch.zeros(20, 8),
             step=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    a.update(over)
    return a


@pytest.mark.parametrize("over, error, pattern", [
    (dict(lr=float("inf")), ValueError, r"lr must be >= 0 and finite, got inf"),
    (dict(lr=float("nan")), ValueError, r"lr must be >= 0 and finite, got nan"),
    (dict(eps=float("inf")), ValueError, r"eps must be > 0 and finite, got inf"),
    (dict(eps=float("nan")), ValueError, r"eps must be > 0 and finite"),
    (dict(betas=(float("nan"), 0.999)), ValueError, r"betas must lie in \[0, 1\), got \(nan, 0\.999\)"),
    (dict(betas=(0.9, float("inf"))), ValueError, r"betas must lie in \[0, 1\)"),
    (dict(betas=(0.9, 0.99, 0.999)), ValueError, r"betas must be a pair \(beta1, beta2\), got \(0\.9, 0\.99, "),
    (dict(betas=0.9), ValueError, r"betas must be a pair \(beta1, beta2\), got 0\.9"),
    (dict(lr="0.1"), TypeError, r"lr must be a real number, got str"),
    (dict(lr=True), TypeError, r"lr must be a real number, got bool"),
    (dict(step=2**63), ValueError, r"step must be an int >= 1 \(Adam counts steps from 1\) and < 2\*\*63, got "
                                   r"9223372036854775808"),
    (dict(step=2**70), ValueError, r"step must be an int >= 1"),
    (dict(step=2.0), ValueError, r"step must be an int >= 1"),
])
def test_21_14_decoder_norm_step_refuses_bad_hyperparameters(backend, device, over, error, pattern):
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _step_args(**over).items()}
    before = a["W_dec"].clone()
    with pytest.raises(error, match=pattern):
        dlmscope.decoder_norm_step(**a, backend=backend)
    assert torch.equal(a["W_dec"], before)


def test_21_14_decoder_norm_step_largest_step_matches_reference(backend, device):
    """step = 2**63 - 1, the largest the op's int64 holds, is accepted: bias corrections are 1."""
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _step_args(step=2**63 - 1).items()}
    a["exp_avg_sq"] += 1e-4
    ref = {k: v.detach().cpu().double() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    dlmscope.decoder_norm_step(**a, backend=backend)
    reference.decoder_norm_step(**ref)
    torch.testing.assert_close(a["W_dec"].cpu().double(), ref["W_dec"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("alias", ["exp_avg_sq is exp_avg", "exp_avg is W_dec", "grad is W_dec",
                                   "grad is exp_avg_sq", "overlapping views"])
def test_21_14_decoder_norm_step_refuses_aliased_tensors(backend, device, alias):
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _step_args().items()}
    if alias == "overlapping views":  # rows 0..19 and 10..29 of one buffer
        buf = torch.zeros(30, 8, device=device)
        a["exp_avg"], a["exp_avg_sq"] = buf[:20], buf[10:]
        names = r"exp_avg and exp_avg_sq"
    else:
        target, source = alias.split(" is ")
        a[target] = a[source]
        names = rf"({target} and {source}|{source} and {target})"
    with pytest.raises(ValueError, match=rf"{names} share memory"):
        dlmscope.decoder_norm_step(**a, backend=backend)


def test_21_14_decoder_norm_step_accepts_disjoint_views_of_one_buffer(backend, device):
    """Two halves of one buffer do not overlap: accepted, and the result is the reference's."""
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _step_args().items()}
    buf = torch.zeros(40, 8, device=device)
    a["exp_avg"], a["exp_avg_sq"] = buf[:20], buf[20:]
    ref = {k: v.detach().cpu().double().clone() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    dlmscope.decoder_norm_step(**a, backend=backend)
    reference.decoder_norm_step(**ref)
    for name in ("W_dec", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(a[name].cpu().double(), ref[name], atol=1e-5, rtol=1e-5)
