"""TopKSAE: the module's behaviour on top of the ops (shapes, dtypes, gradients, decoder geometry, bad input)."""
from __future__ import annotations

import pytest
import torch

from dlmscope.sae.topk import SAEConfig, TopKSAE
from tests.helpers.saes import perturbed_sae as make_sae

D, N, K = 16, 64, 4


def dense_reference(sae: TopKSAE, x: torch.Tensor):
    """float64 dense oracle: (dense code [..., n], x_hat [..., d])."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = torch.relu((x.double() - b_dec) @ W_enc.T + b_enc)
    top = pre.topk(sae.k, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    return f, f @ W_dec + b_dec


# ---- construction ----------------------------------------------------------------------------------------------


def test_init_follows_the_recipe():
    sae = TopKSAE(D, N, K, generator=torch.Generator().manual_seed(1))
    assert sae.d == D and sae.n == N and sae.k == K
    assert sae.W_enc.shape == (N, D) and sae.W_dec.shape == (N, D)
    assert sae.b_enc.shape == (N,) and sae.b_dec.shape == (D,)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()  # tied at init, separate parameters
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert {name for name, _ in sae.named_parameters()} == {"W_enc", "b_enc", "W_dec", "b_dec"}


def test_init_is_reproducible_from_a_generator():
    a = TopKSAE(D, N, K, generator=torch.Generator().manual_seed(7))
    b = TopKSAE(D, N, K, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.W_dec, b.W_dec)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(d=0, n=4, k=1), r"SAEConfig.d must be a positive int"),
    (dict(d=4, n=4, k=5), r"k must be <= n"),
    (dict(d=4, n=True, k=1), r"SAEConfig.n must be a positive int"),
    (dict(d=4, n=8, k=2.0), r"SAEConfig.k must be a positive int"),
])
def test_bad_config_raises(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SAEConfig(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        TopKSAE(kwargs["d"], kwargs["n"], kwargs["k"])


def test_config_round_trips_through_a_dict():
    cfg = SAEConfig(d=D, n=N, k=K, meta={"layer": 3, "policy": "mask"})
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown SAEConfig fields \['bogus'\]"):
        SAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_extra_repr_and_cfg_json():
    sae = make_sae()
    assert "d=16, n=64, k=4" in repr(sae)
    assert '"k": 4' in sae.cfg_json()


# ---- forward -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 1, 3)])
def test_encode_decode_forward_on_leading_shapes(lead):
    sae = make_sae()
    x = torch.randn(*lead, D, generator=torch.Generator().manual_seed(2))
    values, indices = sae.encode(x)
    assert values.shape == (*lead, K) and indices.shape == (*lead, K)
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    x_hat = sae.decode(values, indices)
    assert x_hat.shape == x.shape
    assert torch.equal(sae(x), x_hat)

    f_ref, x_hat_ref = dense_reference(sae, x)
    dense = sae.encode_dense(x)
    assert dense.shape == (*lead, N)
    torch.testing.assert_close(dense.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat.double(), x_hat_ref, rtol=1e-5, atol=1e-5)


def test_encode_matches_the_flattened_batch():
    sae = make_sae()
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(3))
    v3, i3 = sae.encode(x)
    v2, i2 = sae.encode(x.reshape(6, D))
    assert torch.equal(sae.encode_dense(x).reshape(6, N), sae.encode_dense(x.reshape(6, D)))
    torch.testing.assert_close(sae(x).reshape(6, D), sae(x.reshape(6, D)))
    assert v3.reshape(6, K).sort(-1).values.equal(v2.sort(-1).values)


def test_encode_dense_has_at_most_k_nonzeros_and_they_are_the_values():
    sae = make_sae()
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(4))
    values, indices = sae.encode(x)
    dense = sae.encode_dense(x)
    assert int((dense != 0).sum(-1).max()) <= K
    assert (dense >= 0).all()
    assert torch.equal(dense.gather(-1, indices), values)


def test_encode_k_override():
    sae = make_sae()
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(5))
    values, indices = sae.encode(x, k=8)
    assert values.shape == (8, 8)
    # the k largest of a larger selection are the default selection
    top4 = values.topk(K, dim=-1).values.sort(-1).values
    torch.testing.assert_close(top4, sae.encode(x)[0].sort(-1).values)


def test_forward_matches_across_backends(backend, device):
    sae = make_sae(backend=backend, device=device)
    reference = make_sae(backend="torch")
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(sae(x.to(device)).cpu(), reference(x), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(sae.encode_dense(x.to(device)).cpu(), reference.encode_dense(x), rtol=2e-5, atol=2e-5)


# ---- dtypes and gradients ----------------------------------------------------------------------------------------


def test_bf16_activations_with_fp32_weights():
    sae = make_sae(torch.float32)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(7))
    x_bf16 = x.to(torch.bfloat16)
    x_hat = sae(x_bf16)
    assert x_hat.dtype == torch.bfloat16
    assert sae.encode(x_bf16)[0].dtype == torch.bfloat16
    assert sae.W_enc.dtype == torch.float32  # the stored weights are untouched
    # same as running the fp32 SAE on the bf16-rounded input, to bf16 precision (selection may differ on near-ties)
    _, ref = dense_reference(sae, x_bf16.float())
    err = (x_hat.double() - ref).norm() / ref.norm()
    assert err < 3e-2


def test_gradients_reach_fp32_params_from_bf16_activations():
    sae = make_sae(torch.float32)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    loss = (sae(x).float() - x.float()).pow(2).sum()
    loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None, name
        assert p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradients_match_a_dense_float64_autograd_reference():
    sae = make_sae(torch.float64)
    x = torch.randn(12, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    loss = (sae(x) - x.detach()).pow(2).sum()
    loss.backward()

    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(True)
    pre = torch.relu((x_ref - params["b_dec"]) @ params["W_enc"].T + params["b_enc"])
    idx = pre.topk(K, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
    x_hat = f @ params["W_dec"] + params["b_dec"]
    (x_hat - x_ref.detach()).pow(2).sum().backward()

    torch.testing.assert_close(x.grad, x_ref.grad)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, msg=name)


# ---- decoder geometry --------------------------------------------------------------------------------------------


def test_normalize_decoder_makes_unit_rows_and_keeps_directions():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N, 1, generator=torch.Generator().manual_seed(10)) * 3 + 0.1)
    before = sae.W_dec.detach().clone()
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))
    cos = torch.nn.functional.cosine_similarity(sae.W_dec, before, dim=1)
    torch.testing.assert_close(cos, torch.ones(N))
    assert sae.W_dec.requires_grad  # still the same parameter
    assert not torch.equal(sae.W_enc, sae.W_dec)  # only the decoder is touched


def test_normalize_decoder_leaves_zero_rows_finite():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec[3].zero_()
    sae.normalize_decoder()
    assert torch.isfinite(sae.W_dec).all()
    assert not sae.W_dec[3].any()


def test_normalize_decoder_is_not_recorded_by_autograd():
    sae = make_sae()
    sae.normalize_decoder()
    assert sae.W_dec.grad_fn is None and sae.W_dec.is_leaf


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_wrong_width_raises():
    sae = make_sae()
    with pytest.raises(ValueError, match=r"x has shape \[4, 15\] but this SAE expects \[..., d=16\]"):
        sae(torch.randn(4, 15))
    with pytest.raises(ValueError, match=r"d=16"):
        sae.encode(torch.randn(16, 4))
    with pytest.raises(ValueError, match=r"d=16"):
        sae.encode_dense(torch.randn(3, 17))


def test_non_tensor_and_scalar_inputs_raise():
    sae = make_sae()
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        sae([0.0] * D)
    with pytest.raises(ValueError, match=r"x has shape \[\]"):
        sae(torch.tensor(1.0))


def test_integer_input_raises():
    sae = make_sae()
    with pytest.raises(TypeError, match=r"x must be float32, float64, bfloat16 or float16"):
        sae(torch.ones(2, D, dtype=torch.int64))


def test_bad_k_override_raises():
    sae = make_sae()
    with pytest.raises(ValueError, match=r"k=65"):
        sae.encode(torch.randn(2, D), k=N + 1)
    with pytest.raises(TypeError, match=r"k must be an int"):
        sae.encode(torch.randn(2, D), k=2.5)


def test_nan_input_raises():
    sae = make_sae()
    x = torch.randn(2, D)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        sae(x)


def test_decode_rejects_out_of_range_indices():
    sae = make_sae()
    values = torch.ones(2, K)
    indices = torch.full((2, K), N, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n\) = \[0, 64\)"):
        sae.decode(values, indices)


# ---- persistence entry points ------------------------------------------------------------------------------------


def test_save_and_load_entry_points(tmp_path):
    sae = make_sae()
    sae.cfg.meta.update(layer=3, policy="mask")
    out = sae.save(tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    loaded = TopKSAE.load(out)
    assert loaded.cfg == sae.cfg and loaded.backend is None
    x = torch.randn(4, D)
    assert torch.equal(loaded(x), sae(x))
    assert TopKSAE.load(out, backend="torch").backend == "torch"

    as_double = TopKSAE.load(out, dtype=torch.float64)
    assert as_double.W_enc.dtype == torch.float64
    assert torch.equal(as_double.W_enc, sae.W_enc.double())


# ---- from_state / state ------------------------------------------------------------------------------------------


def test_from_state_owns_its_parameters():
    """A copy made through the state is independent: training either leaves the other unchanged."""
    original = make_sae()
    snapshot = {name: p.detach().clone() for name, p in original.named_parameters()}
    copy = TopKSAE.from_state(*original.state())
    assert copy.cfg == original.cfg and copy.cfg is not original.cfg
    for name, p in copy.named_parameters():
        assert torch.equal(p, snapshot[name]) and p.is_contiguous() and p.requires_grad, name
        assert p.untyped_storage().data_ptr() != getattr(original, name).untyped_storage().data_ptr(), name

    opt = torch.optim.SGD(copy.parameters(), lr=0.1)
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(1))
    (copy(x) - x).pow(2).sum().backward()
    opt.step()
    copy.normalize_decoder()
    assert not torch.equal(copy.W_enc, snapshot["W_enc"])  # the copy did train
    for name, p in original.named_parameters():
        assert torch.equal(p, snapshot[name]) and p.grad is None, name

    with torch.no_grad():
        original.b_dec.add_(1.0)  # and the other way round
    assert not torch.equal(copy.b_dec, original.b_dec)


def test_from_state_copies_the_given_tensors_and_config():
    cfg, tensors = make_sae().state()
    tensors = {name: t.clone() for name, t in tensors.items()}
    tensors["W_enc"] = tensors["W_enc"].T.contiguous().T  # a non-contiguous input is fine
    cfg.meta["source"] = {"layer": 3}
    sae = TopKSAE.from_state(cfg, tensors)
    assert sae.W_enc.is_contiguous() and torch.equal(sae.W_enc, tensors["W_enc"])
    tensors["b_enc"].fill_(7.0)
    cfg.meta["source"]["layer"] = 4
    assert not bool((sae.b_enc == 7.0).any()) and sae.cfg.meta["source"] == {"layer": 3}


def test_state_is_a_view_of_the_parameters():
    """state() copies nothing (cheap to save): its tensors share the parameters' storage, without autograd."""
    sae = make_sae()
    cfg, tensors = sae.state()
    assert cfg is sae.cfg
    for name, t in tensors.items():
        p = getattr(sae, name)
        assert t.data_ptr() == p.data_ptr() and not t.requires_grad, name
    with torch.no_grad():
        sae.b_dec.add_(1.0)
    assert torch.equal(tensors["b_dec"], sae.b_dec)


def test_from_state_rejects_wrong_shapes_and_missing_tensors():
    cfg, tensors = make_sae().state()
    with pytest.raises(ValueError, match=r"^from_state: W_enc has shape \[64, 15\], the SAE's cfg \(d=16, n=64\) "
                                         r"needs \[64, 16\]$"):
        TopKSAE.from_state(cfg, {**tensors, "W_enc": tensors["W_enc"][:, :15]})
    with pytest.raises(ValueError, match=r"^from_state: missing tensor 'b_dec' \(got \['W_dec', 'W_enc', 'b_enc'\]\)$"):
        TopKSAE.from_state(cfg, {k: v for k, v in tensors.items() if k != "b_dec"})
    with pytest.raises(ValueError, match=r"^from_state: b_enc has shape \[64\], the SAE's cfg \(d=16, n=32\)"):
        TopKSAE.from_state({"d": D, "n": 32, "k": K}, {**tensors, "W_enc": tensors["W_enc"][:32],
                                                       "W_dec": tensors["W_dec"][:32]})
