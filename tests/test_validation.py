"""Bad input raises TypeError/ValueError naming the argument and the shapes; backend selection rules."""
from __future__ import annotations

import pytest
import torch

import dlmscope
from dlmscope.backends import ENV_VAR, resolve_backend


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
