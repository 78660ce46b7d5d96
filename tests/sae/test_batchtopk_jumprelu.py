"""BatchTopKSAE and JumpReLUSAE: the modules on top of dlmscope.sae.sparsity — their codes against dlmscope.reference
in training and eval mode, the BatchTopK threshold update, JumpReLU's gradients (the threshold's included),
the adaptive code width, state / save / load round trips, on every backend available here."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dlmscope import reference
from dlmscope.sae import formats
from dlmscope.sae.batchtopk import BatchTopKSAE
from dlmscope.sae.jumprelu import JumpReLUSAE
from dlmscope.sae.topk import TopKSAE

from tests.helpers.codes import assert_code, batchtopk_cut, pre_and_slack
from tests.helpers.devices import native_float64, tolerance

D, N, K = 8, 48, 3
F64 = torch.float64


def perturb(sae, seed=0):
    """Move the SAE off its init (biases, untied encoder) so that every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(sae.n, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(sae.d, generator=g))
        sae.W_enc.add_(0.2 * torch.randn(sae.n, sae.d, generator=g))
    return sae


def batchtopk(dtype=F64, **kwargs):
    return perturb(BatchTopKSAE(D, N, K, dtype=dtype, generator=torch.Generator().manual_seed(1), **kwargs))


def jumprelu_sae(dtype=F64, **kwargs):
    sae = perturb(JumpReLUSAE(D, N, K, dtype=dtype, generator=torch.Generator().manual_seed(2), **kwargs))
    with torch.no_grad():  # thresholds spread over the pre-activations' range, so that codes are neither empty nor full
        sae.log_threshold.copy_(torch.log(0.2 + torch.rand(N, generator=torch.Generator().manual_seed(3))))
    return sae


def weights(sae):
    return [p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.b_dec)]


def dense(values, indices, n=N):
    flat = reference.densify(values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]), n)
    return flat.reshape(*values.shape[:-1], n)


def inputs(*lead, seed=0, dtype=F64):
    return torch.randn(*lead, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ref_args(sae, x):
    W_enc, b_enc, b_dec = weights(sae)
    return x.reshape(-1, D).double(), W_enc, b_enc, b_dec


# Codes are compared with tests/helpers/codes.py (float64 where native, else float32 level away from a cut).


def assert_close_at(got, want, backend, exact, msg=None):
    """``exact`` (rtol and atol) where the backend computes float64 natively, else ``tolerance`` relative to the
    size of ``want``."""
    got, want = got.detach().cpu(), want.detach()
    if native_float64(backend):
        torch.testing.assert_close(got, want, rtol=exact, atol=exact, msg=msg)
        return
    tol = tolerance(F64, backend)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, float(want.abs().max())), msg=msg)


# ---- BatchTopKSAE -------------------------------------------------------------------------------------------------


def test_batchtopk_init_config_and_buffers():
    sae = BatchTopKSAE(D, N, K)
    assert sae.cfg.arch == "batchtopk" and sae.ARCH == "batchtopk" and sae.cap == min(N, 4 * K)
    assert sae.threshold.shape == () and float(sae.threshold) == 0.0 and int(sae.threshold_updates) == 0
    assert {name for name, _ in sae.named_parameters()} == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert BatchTopKSAE(D, N, K, dtype=torch.bfloat16).threshold.dtype == torch.float32  # the EMA stays wide
    with pytest.raises(ValueError, match="cap"):
        BatchTopKSAE(D, N, K, cap=K - 1)
    with pytest.raises(ValueError, match="threshold_beta"):
        BatchTopKSAE(D, N, K, threshold_beta=1.0)


@pytest.mark.parametrize("lead", [(16,), (4, 5), (1,)])
def test_batchtopk_training_encode_is_the_reference(backend, device, lead):
    sae = batchtopk().to(device)
    sae.backend = backend
    x = inputs(*lead, seed=4)
    values, indices = sae.encode(x.to(device))
    assert values.shape[:-1] == lead and values.shape[-1] >= sae.cap
    want = reference.batchtopk_encode(*ref_args(sae, x), K)
    got = dense(values, indices).reshape(-1, N).cpu()
    assert_code(got, want, backend, ref_args(sae, x), batchtopk_cut(*ref_args(sae, x), K))
    x_hat = sae(x.to(device))
    W_dec, b_dec = sae.W_dec.detach().double().cpu(), sae.b_dec.detach().double().cpu()
    # the decode of the code checked above (without native float64 it may differ from want within rounding of tau)
    code = want if native_float64(backend) else got
    assert_close_at(x_hat.reshape(-1, D), code @ W_dec + b_dec, backend, 1e-10)


def test_batchtopk_threshold_is_an_ema_of_the_smallest_kept_activation():
    sae = batchtopk(threshold_beta=0.9)
    stats = []
    for seed in range(3):
        x = inputs(12, seed=10 + seed)
        sae.encode(x)
        stats.append(float(reference.batchtopk_min_selected(reference.batchtopk_encode(*ref_args(sae, x), K))))
    want = stats[0]  # the first batch sets it
    for m in stats[1:]:
        want = 0.9 * want + 0.1 * m
    assert float(sae.threshold) == pytest.approx(want, rel=1e-12) and int(sae.threshold_updates) == 3

    before = sae.threshold.clone()
    sae.encode(inputs(12, seed=20), update_threshold=False)
    sae.update_threshold(torch.zeros(4, 5, dtype=F64))  # a batch that keeps nothing changes nothing
    with torch.no_grad():
        sae.eval()
        sae.encode(inputs(12, seed=21))  # eval mode never updates
    assert torch.equal(sae.threshold, before) and int(sae.threshold_updates) == 3


def test_batchtopk_encode_with_aux_is_the_training_code_and_leaves_the_threshold():
    """In either mode: the training code (as encode's in training mode) and the dead latents' selection, leading
    dimensions kept; the threshold untouched."""
    sae = batchtopk()
    x, dead = inputs(4, 5, seed=6), torch.arange(N) % 4 == 0
    want_v, want_i = sae.train().encode(x, update_threshold=False)
    sae.eval()
    values, indices, a_v, a_i = sae.encode_with_aux(x, dead, 5)
    torch.testing.assert_close(dense(values, indices), dense(want_v, want_i), rtol=0, atol=1e-12)
    assert a_v.shape == a_i.shape == (4, 5, 5) and bool(dead[a_i[a_v > 0]].all())
    assert int(sae.threshold_updates) == 0 and float(sae.threshold) == 0.0


def test_batchtopk_eval_encode_is_the_threshold_rule(backend, device):
    sae = batchtopk()
    with torch.no_grad():
        sae.threshold.fill_(0.6)
    sae = sae.to(device).eval()
    sae.backend = backend
    x = inputs(3, 7, seed=5)
    values, indices = sae.encode(x.to(device))
    want = reference.threshold_encode(*ref_args(sae, x), torch.tensor(0.6, dtype=F64))
    assert_code(dense(values, indices), want, backend, ref_args(sae, x), 0.6)
    assert values.shape[-1] < N  # the width is the cap (or a doubling of it), not n


def test_batchtopk_gradients_match_dense_autograd():
    sae = batchtopk()
    x = inputs(10, seed=6)
    (sae(x) - x).pow(2).sum().backward()
    leaves = [p.detach().clone().requires_grad_(True) for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    code = reference.batchtopk_encode(x, leaves[0], leaves[1], leaves[3], K)
    (code @ leaves[2] + leaves[3] - x).pow(2).sum().backward()
    for name, p, q in zip(("W_enc", "b_enc", "W_dec", "b_dec"), (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), leaves):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10, msg=name)


def test_batchtopk_state_save_load_round_trip(tmp_path):
    sae = batchtopk()
    sae.encode(inputs(16, seed=7))  # a trained threshold
    cfg, tensors = sae.state()
    assert cfg.arch == "batchtopk" and tensors["threshold"].shape == () and float(tensors["threshold"]) > 0
    sae.save(tmp_path / "sae")
    loaded = BatchTopKSAE.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg and int(loaded.threshold_updates) == 1 and loaded.cap == sae.cap
    for name, t in tensors.items():
        assert torch.equal(loaded.state()[1][name], t), name
    sae.eval(), loaded.eval()
    x = inputs(5, seed=8)
    assert torch.equal(sae(x), loaded(x))
    copy = BatchTopKSAE.from_state(*sae.state())
    with torch.no_grad():
        copy.threshold.fill_(9.0)
    assert float(sae.threshold) != 9.0  # from_state copies
    with pytest.raises(ValueError, match="'topk' SAE's state"):
        BatchTopKSAE.from_state(*TopKSAE(D, N, K).state())
    with pytest.raises(ValueError, match="'batchtopk' SAE's state"):
        TopKSAE.from_state(*sae.state())
    fresh = BatchTopKSAE.from_state(cfg, {**tensors, "threshold": torch.zeros(())})
    assert int(fresh.threshold_updates) == 0  # an untrained threshold: the next batch sets it


@pytest.mark.parametrize("fmt", ["dlmscope", "saelens", "dictionary_learning"])
def test_batchtopk_cap_and_threshold_beta_are_saved_and_loaded(tmp_path, fmt):
    """Non-default ones travel in the meta and come back as attributes (the config equal to the saved SAE's); a
    default SAE's meta names neither, so its files are unchanged; a checkpoint without them gets the defaults."""
    sae = batchtopk(cap=5, threshold_beta=0.9)
    cfg, _ = sae.state()
    assert cfg.meta["batchtopk_cap"] == 5 and cfg.meta["batchtopk_threshold_beta"] == 0.9
    assert "batchtopk_cap" not in sae.cfg.meta  # the SAE's own config is left alone
    loaded = BatchTopKSAE.load(sae.save(tmp_path / "a", format=fmt))
    assert (loaded.cap, loaded.threshold_beta) == (5, 0.9) and loaded.cfg == sae.cfg
    assert loaded.state()[0].meta == cfg.meta
    default = batchtopk()
    assert default.state()[0] is default.cfg and "batchtopk_cap" not in default.cfg.meta
    old = BatchTopKSAE.load(default.save(tmp_path / "b", format=fmt))  # as written before they were saved
    assert (old.cap, old.threshold_beta) == (min(N, 4 * K), 0.999)
    tensors = sae.state()[1]
    for key, bad in [("batchtopk_cap", K - 1), ("batchtopk_cap", 4.0), ("batchtopk_threshold_beta", 1.0),
                     ("batchtopk_threshold_beta", "0.9")]:
        with pytest.raises(ValueError, match=rf"meta\['{key}'\]"):
            BatchTopKSAE.from_state(dataclasses.replace(cfg, meta={**cfg.meta, key: bad}), tensors)
    stale = batchtopk(meta={"batchtopk_cap": 7})  # a stale entry in the meta does not outvote the attribute
    assert stale.cap == min(N, 4 * K) and "batchtopk_cap" not in stale.state()[0].meta


def test_batchtopk_bf16_activations_with_fp32_weights():
    sae = batchtopk(dtype=torch.float32)
    x = inputs(16, seed=9, dtype=torch.float32).to(torch.bfloat16)
    x_hat = sae(x)
    assert x_hat.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32
    x_hat.float().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sae.parameters())


# ---- JumpReLUSAE --------------------------------------------------------------------------------------------------


def test_jumprelu_init_config_and_bandwidth():
    sae = JumpReLUSAE(D, N, K)
    assert sae.cfg.arch == "jumprelu" and sae.cap == K and sae.eps == 0.05  # for the trainer's normalised scale
    assert sae.cfg.meta["jumprelu_bandwidth"] == 0.05
    torch.testing.assert_close(sae.threshold, torch.full((N,), 0.1))
    assert {name for name, _ in sae.named_parameters()} == {"W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"}
    assert JumpReLUSAE(D, N, K, meta={"jumprelu_bandwidth": 0.001}).eps == 0.001
    assert JumpReLUSAE(D, N, K, eps=0.2, init_threshold=0.5).cfg.meta["jumprelu_bandwidth"] == 0.2
    with pytest.raises(ValueError, match="bandwidth"):
        JumpReLUSAE(D, N, K, eps=0.0)
    with pytest.raises(ValueError, match="init_threshold"):
        JumpReLUSAE(D, N, K, init_threshold=-1.0)


@pytest.mark.parametrize("training", [True, False])
def test_jumprelu_encode_is_the_threshold_rule(backend, device, training):
    sae = jumprelu_sae().to(device).train(training)
    sae.backend = backend
    x = inputs(4, 6, seed=11)
    values, indices = sae.encode(x.to(device))
    theta = sae.threshold.detach().double().cpu()
    want = reference.threshold_encode(*ref_args(sae, x), theta)
    assert_code(dense(values, indices), want, backend, ref_args(sae, x), theta)
    assert values.shape[:-1] == (4, 6) and values.shape[-1] < N


def test_jumprelu_gradients_match_the_dense_reference_with_the_threshold(backend, device):
    eps, lam = 0.3, 0.5
    sae = jumprelu_sae(eps=eps).to(device)
    sae.backend = backend
    x = inputs(12, seed=15)  # pre-activations far from θ and the window's edges (checked below)
    values, indices, l0 = sae.encode_with_l0(x.to(device))
    loss = (sae.decode(values, indices) - x.to(device)).pow(2).sum() + lam * l0
    loss.backward()

    names = ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")
    leaves = {name: getattr(sae, name).detach().cpu().clone().requires_grad_(True) for name in names}
    pre = reference.pre_activations(x, leaves["W_enc"], leaves["b_enc"], leaves["b_dec"])
    theta = leaves["log_threshold"].exp()
    window = ((pre - theta).abs() < eps / 2) & (pre <= theta)
    assert bool(window.any()), "the test needs window entries below θ"
    # the gradients jump at θ and at the window's edges: without native float64 the backend must put every entry on
    # the same side of each as float64 does, so this batch (seed 15) has no entry within float32 rounding of one
    _, slack = pre_and_slack(backend, x, leaves["W_enc"], leaves["b_enc"], leaves["b_dec"])  # 0 if native
    for cut in (theta, theta - eps / 2, theta + eps / 2):
        assert native_float64(backend) or bool(((pre - cut).abs() > slack).all()), "an entry at a cut's rounding"
    code = reference.jumprelu(pre, theta, eps)
    l0_ref = reference.jumprelu_l0(pre, theta, eps)
    torch.testing.assert_close(l0.cpu(), l0_ref.detach())
    ((code @ leaves["W_dec"] + leaves["b_dec"] - x).pow(2).sum() + lam * l0_ref).backward()
    for name in names:
        assert_close_at(getattr(sae, name).grad, leaves[name].grad, backend, 1e-10, msg=name)
    assert leaves["log_threshold"].grad.abs().sum() > 0


def test_jumprelu_code_width_adapts_to_the_batch():
    sae = jumprelu_sae()
    x = inputs(16, seed=13)
    pre = reference.pre_activations(*ref_args(sae, x))
    most = int((pre > sae.threshold.detach() - sae.eps / 2).sum(-1).max())
    assert most > K  # the first batch overflows the initial width K
    values, _ = sae.encode(x)
    assert values.shape[-1] >= most and sae.cap == min(N, max(K, 2 * most))
    with torch.no_grad():
        sae.log_threshold.fill_(math.log(1e6))  # nothing fires: the width falls back to k
    sae.encode(x)
    assert sae.cap == K
    sae.eval()
    sae.encode(x)
    assert sae.cap == K  # eval mode leaves it


def test_jumprelu_state_save_load_round_trip(tmp_path):
    sae = jumprelu_sae(dtype=torch.float32, eps=0.01)
    cfg, tensors = sae.state()
    assert cfg.arch == "jumprelu" and tensors["threshold"].shape == (N,)
    sae.save(tmp_path / "sae")
    loaded = JumpReLUSAE.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg and loaded.eps == 0.01 and loaded.cap == K
    got = loaded.state()[1]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(got[name], tensors[name]), name
    # threshold = exp(log_threshold): exact to a few ulps, not bitwise
    torch.testing.assert_close(got["threshold"], tensors["threshold"], rtol=1e-6, atol=0)
    assert torch.equal(formats.load(tmp_path / "sae")[1]["threshold"], tensors["threshold"])
    sae.eval(), loaded.eval()
    x = inputs(5, seed=14, dtype=torch.float32)
    torch.testing.assert_close(sae(x), loaded(x))
    with pytest.raises(ValueError, match=">= 0"):
        JumpReLUSAE.from_state(cfg, {**tensors, "threshold": -tensors["threshold"]})
    zero = JumpReLUSAE.from_state(cfg, {**tensors, "threshold": torch.zeros(N)})
    assert torch.equal(zero.threshold, torch.zeros(N))  # log 0 = −inf: fires at any positive pre-activation


def test_a_zero_threshold_loads_exactly_and_is_floored_to_train():
    """θ = 0 (a SAELens plain-ReLU latent) loads as log θ = −inf: the file's inference, but no gradient to that
    threshold; untrainable_latents names such latents and floor_threshold_ raises them so that they train."""
    sae = jumprelu_sae(dtype=torch.float32, eps=0.3)
    cfg, tensors = sae.state()
    theta = tensors["threshold"].clone()
    theta[[3, 7]] = 0.0
    zero = JumpReLUSAE.from_state(cfg, {**tensors, "threshold": theta})
    assert zero.untrainable_latents().tolist() == [3, 7] and sae.untrainable_latents().numel() == 0
    assert torch.equal(zero.state()[1]["threshold"][[3, 7]], torch.zeros(2))
    x = inputs(32, seed=16, dtype=torch.float32)
    for floored in (False, True):
        zero.zero_grad()
        values, indices, l0 = zero.train().encode_with_l0(x)
        ((zero.decode(values, indices) - x).pow(2).sum() + l0).backward()
        grad = zero.log_threshold.grad
        assert bool(torch.isfinite(grad).all()) and bool((grad[[3, 7]] != 0).any()) == floored
        if not floored:
            assert zero.floor_threshold_(0.05) == 2  # the others are >= 0.2
            assert zero.untrainable_latents().numel() == 0
            torch.testing.assert_close(zero.threshold.detach()[[3, 7]], torch.full((2,), 0.05))
    kept = theta >= 0.05
    torch.testing.assert_close(zero.threshold.detach()[kept], theta[kept])  # the others unchanged
    with pytest.raises(ValueError, match="theta_min"):
        zero.floor_threshold_(0.0)


def test_a_training_step_moves_every_parameter():
    for sae in (batchtopk(dtype=torch.float32), jumprelu_sae(dtype=torch.float32, eps=0.3)):
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        x = inputs(32, seed=15, dtype=torch.float32)
        before = {name: p.detach().clone() for name, p in sae.named_parameters()}
        if isinstance(sae, JumpReLUSAE):
            values, indices, l0 = sae.encode_with_l0(x)
            loss = (sae.decode(values, indices) - x).pow(2).sum(-1).mean() + 0.01 * l0
        else:
            loss = (sae(x) - x).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        for name, p in sae.named_parameters():
            assert torch.isfinite(p).all() and not torch.equal(p, before[name]), (type(sae).__name__, name)


def test_encoder_init_scale_per_architecture():
    from dlmscope.sae import CLASSES
    from dlmscope.sae.batchtopk import DEFAULT_ENCODER_INIT_SCALE

    for arch, scale in (("topk", 1.0), ("jumprelu", 1.0), ("batchtopk", DEFAULT_ENCODER_INIT_SCALE),
                        ("matryoshka", DEFAULT_ENCODER_INIT_SCALE)):
        extra = {"prefixes": [4, 16]} if arch == "matryoshka" else {}
        sae = CLASSES[arch](8, 16, 2, generator=torch.Generator().manual_seed(0), **extra)
        torch.testing.assert_close(sae.W_enc.detach(), scale * sae.W_dec.detach(), msg=arch)
    custom = CLASSES["batchtopk"](8, 16, 2, encoder_init_scale=0.5)
    torch.testing.assert_close(custom.W_enc.detach(), 0.5 * custom.W_dec.detach())
    with pytest.raises(ValueError, match="encoder_init_scale must be > 0"):
        CLASSES["topk"](8, 16, 2, encoder_init_scale=0.0)
