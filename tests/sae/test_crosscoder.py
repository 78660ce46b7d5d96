"""Crosscoder (dlmscope.sae.crosscoder): encode/decode against a dense float64 oracle on every backend here,
training on planted paired data, save/load, bad input.

Planted pairs (tests/helpers/planted_pairs.py): S = 2 sources built from one set of F unit directions in R^d. A token
activates each direction independently (probability p, coefficient in [0.5, 1.5]); a SHARED direction adds the same
coefficient·u to both sources, an EXCLUSIVE_0 one to source 0 only, an EXCLUSIVE_1 one to source 1 only; plus a
little Gaussian noise. A good crosscoder then has one latent per direction with concatenated decoder row ∝ [u, u]
(shared, relative norm 0.5), [u, 0] (0) or [0, u] (1).
"""
from __future__ import annotations

import json

import pytest
import torch

from dlmscope import reference
from dlmscope.sae.crosscoder import CFG, WEIGHTS, Crosscoder
from dlmscope.train.crosscoder import fit_crosscoder
from tests.helpers.devices import native_float64, tolerance
from tests.helpers.planted_pairs import planted_pairs, train_planted

F64 = torch.float64


def fve(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-source fraction of variance explained [S] of x, x_hat [B, S, d]."""
    err = (x - x_hat).pow(2).sum(dim=(0, 2))
    var = (x - x.mean(0)).pow(2).sum(dim=(0, 2))
    return 1 - err / var


def random_crosscoder(S=2, d=5, n=40, k=3, rule="topk", seed=0, dtype=F64, device="cpu", backend=None):
    g = torch.Generator().manual_seed(seed)
    cc = Crosscoder(S, d, n, k, rule=rule, dtype=dtype, generator=g, backend=backend)
    with torch.no_grad():
        cc.b_enc.copy_(0.1 * torch.randn(n, generator=g, dtype=dtype))
        cc.b_dec.copy_(0.1 * torch.randn(S, d, generator=g, dtype=dtype))
        cc.W_enc.add_(0.3 * torch.randn(n, S * d, generator=g, dtype=dtype))
    return cc.to(device)


# ---- encode / decode ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["topk", "batchtopk"])
def test_encode_decode_match_dense_oracle(backend, device, rule):
    cc = random_crosscoder(rule=rule, device=device, backend=backend)
    x = torch.randn(17, 2, 5, generator=torch.Generator().manual_seed(3), dtype=F64).to(device)
    values, indices = cc.encode(x)
    code = values.new_zeros(17, cc.n).scatter_add_(1, indices, values)
    want = reference.crosscoder_code(x, cc.W_enc, cc.b_enc, cc.b_dec, cc.k, rule).detach()
    tol = tolerance(F64, backend)
    torch.testing.assert_close(code.detach(), want, rtol=tol, atol=tol)
    x_hat = cc.decode(values, indices)
    assert x_hat.shape == (17, 2, 5)
    torch.testing.assert_close(x_hat.detach(), reference.crosscoder_decode(want, cc.W_dec, cc.b_dec).detach(),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(cc(x).detach(), x_hat.detach(), rtol=tol, atol=tol)
    if rule == "batchtopk":  # eval mode: the threshold rule at the threshold the training call set
        assert float(cc.threshold) > 0
        cc.eval()
        dense = cc.encode_dense(x).detach()
        pre = torch.relu((x.reshape(17, -1) - cc.b_dec.reshape(-1)) @ cc.W_enc.T + cc.b_enc).detach()
        theta = cc.threshold.to(F64)
        # the threshold is this batch's smallest kept value: that entry sits exactly at the cut, and a backend that
        # computes in float32 may keep or drop it; compare away from the cut there
        away = (pre - theta).abs() > 10 * tol * pre.abs().max()
        if native_float64(backend):
            away = torch.ones_like(away)
        torch.testing.assert_close(dense[away], (pre * (pre > theta))[away], rtol=tol, atol=tol)


def test_gradients_match_dense_oracle():
    cc = random_crosscoder()
    x = torch.randn(9, 2, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    ref = {name: p.detach().clone().requires_grad_(True) for name, p in cc.named_parameters()}
    cc(x).pow(2).sum().backward()
    code = reference.crosscoder_code(x, ref["W_enc"], ref["b_enc"], ref["b_dec"], cc.k)
    reference.crosscoder_decode(code, ref["W_dec"], ref["b_dec"]).pow(2).sum().backward()
    for name, p in cc.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-9, atol=1e-9)


# ---- training on planted pairs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["topk", "batchtopk"])
def test_fit_recovers_planted_pairs(rule):
    cc, U, kind, sample, history = train_planted(rule)
    x = sample(4096, torch.Generator().manual_seed(99))  # held out
    with torch.no_grad():
        score = fve(x, cc(x))
    assert bool((score > 0.8).all()), score
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    # the decoder convention: every concatenated row [S·d] has unit norm, per-source norms free
    torch.testing.assert_close(cc.decoder_cat().norm(dim=1), torch.ones(cc.n), rtol=1e-5, atol=1e-5)
    # each planted direction has a latent whose concatenated decoder row points along it
    planted = torch.nn.functional.normalize(torch.cat([U * (kind != 1)[:, None], U * (kind != 0)[:, None]], 1), dim=1)
    cos = planted @ torch.nn.functional.normalize(cc.decoder_cat(), dim=1).T
    assert float((cos.max(1).values > 0.8).float().mean()) >= 0.9


def test_auxk_runs_on_dead_latents():
    U, kind, sample = planted_pairs(1, d=8)
    gen = torch.Generator().manual_seed(2)
    cc = Crosscoder(2, 8, 64, 2, backend="torch", generator=torch.Generator().manual_seed(0))
    history = fit_crosscoder(cc, (sample(64, gen) for _ in range(30)), steps=30, lr=1e-3, dead_tokens=64 * 3)
    assert any(h["dead"] > 0 for h in history) and any(h["auxk"] > 0 for h in history)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


@pytest.mark.parametrize("rule", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [0, 3, 40])
def test_encode_with_aux_matches_a_dense_selection(rule, n_dead):
    """The AuxK code of encode_with_aux equals, per row, the k_aux largest relu'd pre-activations among the dead
    latents (zero-padded where fewer), and its main code equals encode's; none dead, 3 (< k_aux) or all."""
    cc = random_crosscoder(rule=rule)
    x = torch.randn(16, 2, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    dead = torch.zeros(cc.n, dtype=torch.bool)
    dead[torch.randperm(cc.n, generator=torch.Generator().manual_seed(4))[:n_dead]] = True
    k_aux = 5
    values, indices, aux_values, aux_indices = cc.encode_with_aux(x, dead, k_aux)
    want_v, want_i = cc.encode(x, update_threshold=False)
    dense = lambda v, i: v.new_zeros(v.shape[0], cc.n).scatter_add_(1, i, v)  # noqa: E731
    torch.testing.assert_close(dense(values, indices), dense(want_v, want_i))
    pre = torch.relu((x.reshape(16, -1) - cc.b_dec.detach().reshape(-1)) @ cc.W_enc.detach().T + cc.b_enc.detach())
    pre = torch.where(dead, pre, torch.zeros_like(pre))
    top = pre.topk(k_aux, dim=1)
    want_aux = pre.new_zeros(pre.shape).scatter_(1, top.indices, top.values)
    torch.testing.assert_close(dense(aux_values, aux_indices), want_aux)


# ---- save / load --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["topk", "batchtopk"])
def test_save_load_round_trip(tmp_path, rule):
    cc = random_crosscoder(rule=rule, dtype=torch.float32)
    x = torch.randn(8, 2, 5, generator=torch.Generator().manual_seed(5))
    cc(x)  # a training-mode call sets the BatchTopK threshold
    cc.meta["layer"] = 3
    path = cc.save(tmp_path / "cc")
    assert sorted(p.name for p in path.iterdir()) == sorted([CFG, WEIGHTS])
    back = Crosscoder.load(path)
    assert back.config() == cc.config()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(back, name), getattr(cc, name))
    cc.eval(), back.eval()
    torch.testing.assert_close(back(x), cc(x))
    cc.save(path)  # replacing a crosscoder checkpoint is fine
    assert Crosscoder.load(path, dtype=F64).W_dec.dtype == F64


def test_load_refuses_mismatches(tmp_path):
    cc = random_crosscoder(dtype=torch.float32)
    path = cc.save(tmp_path / "cc")
    cfg = json.loads((path / CFG).read_text())

    def write(**changes):
        (path / CFG).write_text(json.dumps({**cfg, **changes}))

    write(format="dlmscope")
    with pytest.raises(ValueError, match="not a crosscoder"):
        Crosscoder.load(path)
    write(version=99)
    with pytest.raises(ValueError, match="version"):
        Crosscoder.load(path)
    write(d=6)
    with pytest.raises(ValueError, match="'W_enc' has shape"):
        Crosscoder.load(path)
    write(k=0)
    with pytest.raises(ValueError, match="bad crosscoder config"):
        Crosscoder.load(path)
    write(rule="jumprelu")
    with pytest.raises(ValueError, match="rule"):
        Crosscoder.load(path)


def test_save_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "eval_results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="eval_results.json"):
        random_crosscoder().save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.json"]


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_bad_input():
    cc = random_crosscoder()
    with pytest.raises(ValueError, match=r"\[B, S=2, d=5\]"):
        cc.encode(torch.randn(4, 10, dtype=F64))
    with pytest.raises(ValueError, match=r"\[B, S=2, d=5\]"):
        cc.encode(torch.randn(4, 3, 5, dtype=F64))
    with pytest.raises(TypeError, match="float"):
        cc.encode(torch.ones(4, 2, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cc.encode([[0.0] * 5] * 2)
    for kwargs, match in (({"k": 41}, "k must be <= n"), ({"rule": "l1"}, "rule"), ({"k": 0}, "k must be"),
                          ({"cap": 2}, "cap"), ({"threshold_beta": 1.0}, "threshold_beta")):
        with pytest.raises(ValueError, match=match):
            Crosscoder(**{"S": 2, "d": 5, "n": 40, "k": 3, **kwargs})
    with pytest.raises(ValueError, match="lr"):
        fit_crosscoder(cc, iter([]), steps=1, lr=0.0)
    with pytest.raises(ValueError, match=r"\[B, S=2, d=5\]"):
        fit_crosscoder(cc, iter([torch.randn(4, 5, dtype=F64)]), steps=1, lr=1e-3)
