"""Splice-in, DLM / AR ΔLM loss (with the Dream shift), scale-free comparison."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlmscope.data.noise import corrupt
from dlmscope.sae.topk import TopKSAE
from dlmscope.analysis.splice import (
    ar_delta_loss,
    average_results,
    collapsed_strata,
    compare_deltas,
    delta_loss_by_layer,
    delta_loss_over_batches,
    dlm_delta_loss,
    per_batch_results,
    pooled_results,
    scale_free,
    splice,
    stratified_ts,
    zero_ablate,
)

from tests.helpers.saes import perfect_sae, random_sae
from tests.helpers.tiny_models import (  # noqa: F401  (fixtures: single_thread is autouse; llada, ar are module-scoped)
    D, LAYERS, MASK, ar, llada, make_dream, single_thread, token_batch,
)


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    # a scaled LM head makes the logits peaked, so shifted and unshifted losses differ materially
    return make_dream(tmp_path_factory.mktemp("dream"), lm_head_scale=30.0)


def test_perfect_sae_reconstructs():
    x = torch.randn(20, D)
    torch.testing.assert_close(perfect_sae()(x), x, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ splice
@pytest.mark.parametrize("which", ["llada", "dream", "ar"])
def test_splice_error_term_is_exact(request, which):
    adapter = request.getfixturevalue(which)
    ids, am = token_batch(seed=4)
    clean = adapter.logits(ids, am)
    sae = random_sae()
    for layer in range(LAYERS):
        with splice(adapter, layer, sae, error_term=True):
            spliced = adapter.logits(ids, am)
        assert torch.equal(spliced, clean)
        with splice(adapter, layer, sae):
            assert not torch.allclose(adapter.logits(ids, am), clean)
    assert torch.equal(adapter.logits(ids, am), clean)  # hooks removed


def test_splice_error_term_passes_gradients_to_sae(llada):
    ids, am = token_batch(seed=1)
    sae = random_sae()
    with splice(llada, 1, sae, error_term=True):
        loss = llada.logits(ids, am).logsumexp(-1).sum()
    loss.backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    llada.model.zero_grad(set_to_none=True)


def test_splice_positions(llada):
    ids, am = token_batch(seed=2, batch=2, seq=10, pad_tail=False)
    noisy, masked = corrupt(ids, am, MASK, 0.4, torch.Generator().manual_seed(0))
    assert masked.any() and (~masked).any()
    sae = random_sae()
    seen = {}

    def grab(_m, _a, out):
        seen["h"] = out

    h = llada.blocks[2].register_forward_hook(grab)
    try:
        with torch.no_grad():
            clean1 = llada.forward_until(noisy, [1])[1]
            with splice(llada, 1, sae, positions="masked"):
                llada.model.model(input_ids=noisy)
                out_masked = seen["h"]
            with splice(llada, 1, sae):
                llada.model.model(input_ids=noisy)
                out_all = seen["h"]
            with splice(llada, 1, sae, positions=masked):
                llada.model.model(input_ids=noisy)
                out_tensor = seen["h"]
    finally:
        h.remove()
    torch.testing.assert_close(out_masked, out_tensor, rtol=0, atol=0)
    # bidirectional model: every position changes, but the layer-1 replacement happened only at masked ones
    captured = {}
    with torch.no_grad(), splice(llada, 1, sae, positions="unmasked"):
        h = llada.blocks[1].register_forward_hook(lambda m, a, o: captured.setdefault("x", o))
        try:
            llada.model.model(input_ids=noisy)
        finally:
            h.remove()
    # hooks run in registration order, so `captured` holds the (positions-limited) spliced output
    x_hat = sae(clean1)
    torch.testing.assert_close(captured["x"][~masked], x_hat[~masked])
    torch.testing.assert_close(captured["x"][masked], clean1[masked], rtol=0, atol=0)
    assert not torch.allclose(out_masked, out_all)
    with pytest.raises(ValueError, match="positions"):
        with splice(llada, 1, sae, positions="maskd"):
            pass
    with pytest.raises(ValueError, match="positions mask has shape"):
        with torch.no_grad(), splice(llada, 1, sae, positions=torch.ones(3, dtype=torch.bool)):
            llada.model.model(input_ids=noisy)


def test_splice_bad_inputs(llada, ar):
    with pytest.raises(ValueError, match="out of range"):
        with splice(llada, LAYERS, random_sae()):
            pass
    with pytest.raises(ValueError, match="does not match"):
        with splice(llada, 0, TopKSAE(D + 1, 8, 2)):
            pass
    with pytest.raises(ValueError, match="mask token|autoregressive"):
        with splice(ar, 0, random_sae(), positions="masked"):
            pass
    ids, am = token_batch()
    with pytest.raises(ValueError, match="mask token|autoregressive|diffusion"):
        dlm_delta_loss(ar, random_sae(), 0, ids, am)
    with pytest.raises(ValueError, match="autoregressive"):
        ar_delta_loss(llada, random_sae(), 0, ids, am)
    with pytest.raises(ValueError, match="out of range"):
        dlm_delta_loss(llada, random_sae(), 7, ids, am)


# ------------------------------------------------------------------------------------------- DLM ΔLM loss
def _hand_dlm(adapter, sae, layer, ids, am, t, seed, shift):
    """Reference L_mask / L_unmask by explicit loops over positions, from raw model logits."""
    noisy, masked = corrupt(ids, am, MASK, t, torch.Generator().manual_seed(seed))

    def raw(replace):
        h = None
        if replace is not None:
            h = adapter.blocks[layer].register_forward_hook(lambda m, a, o: replace(o))
        try:
            with torch.no_grad():
                return adapter.model(input_ids=noisy, attention_mask=am).logits
        finally:
            if h is not None:
                h.remove()

    res = {}
    for name, replace in (("clean", None), ("sae", sae), ("zero", torch.zeros_like)):
        logits = raw(replace)
        s_m = s_u = 0.0
        n_m = n_u = 0
        B, T = ids.shape
        for b in range(B):
            for i in range(T):
                if am[b, i] == 0:
                    continue
                src = (i - 1 if i > 0 else 0) if shift else i
                lp = torch.log_softmax(logits[b, src].double(), -1)[ids[b, i]].item()
                if masked[b, i]:
                    s_m, n_m = s_m - lp, n_m + 1
                elif i > 0:
                    s_u, n_u = s_u - lp, n_u + 1
        res[f"mask_{name}"] = s_m / t / n_m
        res[f"unmask_{name}"] = s_u / (1 - t) / n_u
    res["n_masked"], res["n_unmasked"] = n_m, n_u
    return res


@pytest.mark.parametrize("which", ["llada", "dream"])
def test_dlm_delta_loss_matches_hand_computation(request, which):
    adapter = request.getfixturevalue(which)
    ids, am = token_batch(seed=7, batch=3, seq=14)
    sae = random_sae(3)
    got = dlm_delta_loss(adapter, sae, 1, ids, am, t=0.3, generator=torch.Generator().manual_seed(9))
    ref = _hand_dlm(adapter, sae, 1, ids, am, 0.3, 9, shift=(which == "dream"))
    assert got["t"] == 0.3 and got["n_masked"] == ref["n_masked"] and got["n_unmasked"] == ref["n_unmasked"]
    for key in ("mask_clean", "mask_sae", "mask_zero", "unmask_clean", "unmask_sae", "unmask_zero"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5), key
    assert got["mask_delta"] == pytest.approx(ref["mask_sae"] - ref["mask_clean"], abs=1e-4)
    rec = (ref["mask_zero"] - ref["mask_sae"]) / (ref["mask_zero"] - ref["mask_clean"])
    assert got["mask_recovered"] == pytest.approx(rec, rel=1e-4)


def test_delta_losses_of_several_saes_equal_one_call_each(llada, ar):
    """A list of SAEs shares the batch's corruption and its clean / zero-ablated forwards: each result equals
    the single-SAE call with the same generator."""
    ids, am = token_batch(seed=11, batch=3, seq=14)
    saes = [random_sae(s, k=k) for s, k in ((1, 4), (2, 8), (3, 16))]
    together = dlm_delta_loss(llada, saes, 2, ids, am, generator=torch.Generator().manual_seed(5))
    assert isinstance(together, list) and len(together) == 3
    for sae, got in zip(saes, together):
        alone = dlm_delta_loss(llada, sae, 2, ids, am, generator=torch.Generator().manual_seed(5))
        assert got.keys() == alone.keys()
        for key in alone:
            assert got[key] == pytest.approx(alone[key], rel=1e-6, abs=1e-7), key
    together = ar_delta_loss(ar, saes, 1, ids, am)
    for sae, got in zip(saes, together):
        alone = ar_delta_loss(ar, sae, 1, ids, am)
        assert got.keys() == alone.keys()
        for key in alone:
            assert got[key] == pytest.approx(alone[key], rel=1e-6, abs=1e-7), key
    assert together[0]["sae"] != together[2]["sae"]  # the SAEs really differ


def test_dream_shift_is_applied(dream, monkeypatch):
    """Fails if dlm_delta_loss scores Dream's raw (unshifted) logits."""
    ids, am = token_batch(seed=8, batch=3, seq=14)
    sae = random_sae(1)
    got = dlm_delta_loss(dream, sae, 0, ids, am, t=0.4, generator=torch.Generator().manual_seed(2))
    shifted = _hand_dlm(dream, sae, 0, ids, am, 0.4, 2, shift=True)
    unshifted = _hand_dlm(dream, sae, 0, ids, am, 0.4, 2, shift=False)
    for key in ("mask_clean", "mask_sae", "unmask_clean"):
        assert abs(shifted[key] - unshifted[key]) > 0.05 * shifted[key]  # the shift matters materially here
        assert got[key] == pytest.approx(shifted[key], rel=1e-5)
        assert got[key] != pytest.approx(unshifted[key], rel=0.02)
    # dropping the shift (what the paper's released ΔLM code did for Dream) gives the unshifted numbers
    monkeypatch.setattr(dream, "logit_shift", 0)
    dropped = dlm_delta_loss(dream, sae, 0, ids, am, t=0.4, generator=torch.Generator().manual_seed(2))
    assert dropped["mask_clean"] == pytest.approx(unshifted["mask_clean"], rel=1e-5)
    assert dropped["mask_clean"] != pytest.approx(shifted["mask_clean"], rel=0.02)


def test_dlm_delta_loss_identity_sae_is_zero(llada):
    ids, am = token_batch(seed=5)
    g = torch.Generator().manual_seed(0)
    res = dlm_delta_loss(llada, perfect_sae(), 2, ids, am, generator=g)
    assert 0.05 <= res["t"] <= 0.5
    assert abs(res["mask_delta"]) < 1e-4 and abs(res["unmask_delta"]) < 1e-4
    assert res["mask_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert res["mask_clean"] > 0 and math.isfinite(res["mask_zero"])
    # seeded: same generator seed → same t, same masks, same numbers
    again = dlm_delta_loss(llada, perfect_sae(), 2, ids, am, generator=torch.Generator().manual_seed(0))
    assert again == res


def test_dlm_delta_loss_no_masked_positions(llada):
    ids = torch.randint(3, MASK, (1, 1))  # only position 0, which is never masked
    res = dlm_delta_loss(llada, random_sae(), 0, ids, zero_ablation=False)
    assert res["n_masked"] == 0 and res["mask_clean"] == 0.0 and res["mask_delta"] == 0.0


# -------------------------------------------------------------------------------------------- AR ΔLM loss
def test_ar_delta_loss_matches_hand_computation(ar):
    ids, am = token_batch(seed=6, batch=3, seq=12)
    sae = random_sae(2)
    got = ar_delta_loss(ar, sae, 1, ids, am)
    with torch.no_grad():
        clean = ar.model(input_ids=ids, attention_mask=am).logits
        with splice(ar, 1, sae):
            spl = ar.model(input_ids=ids, attention_mask=am).logits
        with zero_ablate(ar, 1):
            zero = ar.model(input_ids=ids, attention_mask=am).logits
    sel = (am[:, 1:] * am[:, :-1]).bool()

    def ce(lg):
        return F.cross_entropy(lg[:, :-1][sel].double(), ids[:, 1:][sel]).item()

    assert got["n_tokens"] == int(sel.sum())
    assert got["clean"] == pytest.approx(ce(clean), rel=1e-5)
    assert got["sae"] == pytest.approx(ce(spl), rel=1e-5)
    assert got["zero"] == pytest.approx(ce(zero), rel=1e-5)
    assert got["delta"] == pytest.approx(ce(spl) - ce(clean), abs=1e-4)
    # (zero-ablating a block of this random model barely hurts, so compare the formula on our own values)
    assert got["recovered"] == pytest.approx((got["zero"] - got["sae"]) / (got["zero"] - got["clean"]))
    perfect = ar_delta_loss(ar, perfect_sae(), 1, ids, am)
    assert abs(perfect["delta"]) < 1e-4 and perfect["recovered"] == pytest.approx(1.0, abs=1e-4)


def test_scale_free_comparison():
    dlm = {"mask_clean": 10.0, "mask_sae": 9.0, "mask_zero": 20.0, "unmask_clean": 1.0, "unmask_sae": 1.5}
    ar = {"clean": 2.0, "sae": 2.5, "zero": 7.0}
    s = scale_free(dlm)
    assert s["delta"] == -1.0 and s["rel_delta"] == pytest.approx(-0.1) and s["recovered"] == pytest.approx(1.1)
    assert scale_free(dlm, "unmask_")["rel_delta"] == pytest.approx(0.5)
    c = compare_deltas(dlm, ar)
    assert c["dlm_rel_delta"] == pytest.approx(-0.1) and c["ar_rel_delta"] == pytest.approx(0.25)
    assert c["ar_recovered"] == pytest.approx(0.9) and c["recovered_gap"] == pytest.approx(0.2)
    avg = average_results([{"n_masked": 3, "mask_clean": 1.0, "mask_sae": 2.0, "mask_zero": 5.0},
                           {"n_masked": 2, "mask_clean": 3.0, "mask_sae": 2.0, "mask_zero": float("nan")}])
    assert avg["n_masked"] == 5 and avg["mask_clean"] == 2.0 and avg["mask_zero"] == 5.0
    assert avg["mask_recovered"] == pytest.approx(1.0)


def test_dlm_delta_loss_masked_positions_only(llada):
    ids, am = token_batch(seed=3)
    kw = dict(t=0.3, zero_ablation=True)
    full = dlm_delta_loss(llada, random_sae(4), 1, ids, am, generator=torch.Generator().manual_seed(1), **kw)
    part = dlm_delta_loss(llada, random_sae(4), 1, ids, am, generator=torch.Generator().manual_seed(1),
                          positions="masked", **kw)
    assert part["mask_clean"] == full["mask_clean"] and part["n_masked"] == full["n_masked"]
    assert part["mask_sae"] != pytest.approx(full["mask_sae"], rel=1e-3)
    assert part["mask_zero"] != pytest.approx(full["mask_zero"], rel=1e-3)


# ------------------------------------------------------------------------------ estimators over batches (22.5)
def _batch(t, ce_clean, ce_sae):
    """A per-batch result as dlm_delta_loss reports it, from the CE of each masked token (clean and with the
    SAE): ``mask_* = Σ CE / t / #masked``."""
    n = len(ce_clean)
    clean, sae = sum(ce_clean) / t / n, sum(ce_sae) / t / n
    return {"t": t, "n_masked": n, "n_unmasked": 10 - n, "mask_clean": clean, "mask_sae": sae,
            "mask_delta": sae - clean, "unmask_clean": 1.0, "unmask_sae": 1.0, "unmask_delta": 0.0}


def test_pooled_and_per_batch_delta_lm_on_hand_built_batches():
    """Two batches: t = 0.1 with 1 masked token (CE 1 → 2), t = 0.5 with 5 masked tokens (CE 1 → 1). The paper
    pools: (2/0.1 + 5/0.5 − (1/0.1 + 5/0.5)) / 6 = 10/6; the per-batch mean is (10 + 0) / 2 = 5."""
    a, b = _batch(0.1, [1.0], [2.0]), _batch(0.5, [1.0] * 5, [1.0] * 5)
    pooled, per = pooled_results([a, b]), per_batch_results([a, b])
    assert pooled["mask_clean"] == pytest.approx((1 / 0.1 + 5 / 0.5) / 6)
    assert pooled["mask_sae"] == pytest.approx((2 / 0.1 + 5 / 0.5) / 6)
    assert pooled["mask_delta"] == pytest.approx(10 / 6)
    assert per["mask_delta"] == pytest.approx(5.0) and per["mask_clean"] == pytest.approx(6.0)
    assert pooled["n_masked"] == per["n_masked"] == 6 and pooled["n_batches"] == 2 and pooled["t"] == 0.3
    # per-batch SE: std of (10, 0) / √2 = 5; pooled: delta method, Σ_b (D_b − R n_b)² · B/(B−1) / (Σ n)²
    assert per["mask_delta_se"] == pytest.approx(5.0)
    r = 10 / 6
    assert pooled["mask_delta_se"] == pytest.approx(math.sqrt(((10 - r) ** 2 + (0 - 5 * r) ** 2) * 2) / 6)
    # equal batches: the two estimators agree
    same = [_batch(0.3, [1.0, 2.0], [1.5, 2.0])] * 3
    assert pooled_results(same)["mask_delta"] == pytest.approx(per_batch_results(same)["mask_delta"])


def test_pooled_estimator_weights_each_term_by_its_own_count_and_keeps_empty_batches():
    a = {"n_tokens": 3, "clean": 1.0, "sae": 2.0, "delta": 1.0, "zero": 4.0}
    b = {"n_tokens": 1, "clean": 5.0, "sae": 5.0, "delta": 0.0, "zero": 9.0}
    p = pooled_results([a, b])
    assert p["clean"] == pytest.approx(2.0) and p["sae"] == pytest.approx(11 / 4) and p["delta"] == 0.75
    assert p["recovered"] == pytest.approx((p["zero"] - p["sae"]) / (p["zero"] - p["clean"]))
    empty = {"t": 0.2, "n_masked": 0, "n_unmasked": 4, "mask_clean": 0.0, "mask_sae": 0.0, "mask_delta": 0.0,
             "unmask_clean": 2.0, "unmask_sae": 3.0, "unmask_delta": 1.0}
    full = _batch(0.2, [1.0, 1.0], [2.0, 2.0])
    p = pooled_results([empty, full])
    assert p["mask_delta"] == pytest.approx(full["mask_delta"])  # the empty batch adds no masked token
    assert p["unmask_clean"] == pytest.approx((2.0 * 4 + 1.0 * 8) / 12)


def test_pooled_standard_error_shrinks_as_one_over_root_n():
    gen = torch.Generator().manual_seed(0)

    def batches(n):
        out = []
        for _ in range(n):
            t = float(torch.empty(()).uniform_(0.05, 0.5, generator=gen))
            m = int(torch.randint(5, 40, (), generator=gen))
            clean = (torch.rand(m, generator=gen) * 3).tolist()
            out.append(_batch(t, clean, [c + float(torch.randn((), generator=gen)) + 0.2 for c in clean]))
        return out

    se_small, se_large = (pooled_results(batches(n))["mask_delta_se"] for n in (200, 3200))
    assert 0.15 < se_large / se_small < 0.35  # 1/√16 = 0.25
    assert math.isnan(pooled_results(batches(1))["mask_delta_se"])


def test_stratified_ts_cover_the_strata_and_are_seeded():
    ts = stratified_ts(8, 0.1, 0.5, torch.Generator().manual_seed(3))
    strata = sorted(int((t - 0.1) / 0.05) for t in ts)
    assert strata == list(range(8)) and all(0.1 <= t <= 0.5 for t in ts)
    assert ts != sorted(ts)  # the batch order does not carry t
    assert ts == stratified_ts(8, 0.1, 0.5, torch.Generator().manual_seed(3))
    assert ts != stratified_ts(8, 0.1, 0.5, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="at least one"):
        stratified_ts(0)


def test_delta_loss_over_batches_reports_pooled_with_per_batch_beside(llada, ar):
    batches = [token_batch(seed=s, batch=2, seq=12)[0] for s in range(4)]
    saes = [random_sae(1), random_sae(2)]
    got = delta_loss_over_batches(llada, saes, 1, batches, seed=5)
    assert len(got) == 2 and got[0]["estimator"] == "pooled" and got[0]["se_over"] == "batches, collapsed strata"
    assert got[0]["t_sampling"] == "stratified" and got[0]["n_batches"] == 4
    # the same per-batch results, by hand: stratified t from the seed, then one corruption per batch
    gen = torch.Generator().manual_seed(5)
    ts = stratified_ts(4, generator=gen)
    per = [dlm_delta_loss(llada, saes, 1, ids, generator=gen, t=t) for ids, t in zip(batches, ts)]
    mine = [p[1] for p in per]
    assert sorted(int((t - 0.05) / (0.45 / 4)) for t in (r["t"] for r in mine)) == [0, 1, 2, 3]
    strata = collapsed_strata([r["t"] for r in mine], [0] * 4)
    assert got[1]["mask_delta"] == pytest.approx(pooled_results(mine)["mask_delta"], rel=1e-6)
    assert got[1]["mask_delta_se"] == pytest.approx(pooled_results(mine, strata)["mask_delta_se"], rel=1e-6)
    assert got[1]["per_batch"]["mask_delta"] == pytest.approx(per_batch_results(mine)["mask_delta"], rel=1e-6)
    iid = delta_loss_over_batches(llada, saes, 1, batches, seed=5, t_sampling="iid")
    assert iid[0]["t_sampling"] == "iid" and iid[0]["mask_clean"] != pytest.approx(got[0]["mask_clean"])
    assert iid[0]["se_over"] == "batches"
    with pytest.raises(ValueError, match="t_sampling"):
        delta_loss_over_batches(llada, saes, 1, batches, seed=5, t_sampling="even")
    a = delta_loss_over_batches(ar, saes[:1], 1, batches, seed=5)[0]
    assert "t_sampling" not in a and math.isfinite(a["delta_se"]) and "delta_se" in a["per_batch"]


def test_22_5_collapsed_strata_pair_adjacent_t_within_each_round():
    # round 0: t sorted 0.1 (b2), 0.2 (b0), 0.3 (b4), 0.4 (b1), 0.5 (b3) -> pairs {2, 0}, {4, 1, 3} (odd one joins)
    ts = [0.2, 0.4, 0.1, 0.5, 0.3, 0.35, 0.15]
    rounds = [0, 0, 0, 0, 0, 1, 1]
    assert collapsed_strata(ts, rounds) == [0, 1, 0, 1, 1, 2, 2]
    # a last round of one batch joins the group before it
    assert collapsed_strata([0.1, 0.3, 0.2], [0, 0, 2]) == [0, 0, 0]
    with pytest.raises(ValueError, match="round labels"):
        collapsed_strata([0.1], [0, 1])


def test_22_5_collapsed_strata_se_removes_the_spread_of_t_a_known_answer():
    """Known answer: Δ_b = 2·t_b + (−1)^b·σ on equal counts, t stratified over 8 strata. Treating the batches as
    independent counts the spread of t; over adjacent-t pairs the variance of the sum is Σ_pairs (e_a − e_b)²
    and, with the linear trend removed, only σ and the within-pair step of t remain."""
    ts = [0.05 + 0.05 * i for i in range(8)]
    sigma = 0.01
    rows = [{"t": t, "n_masked": 10, "mask_clean": 1.0, "mask_sae": 1.0 + 2 * t + (-1) ** b * sigma,
             "mask_delta": 2 * t + (-1) ** b * sigma} for b, t in enumerate(ts)]
    strata = collapsed_strata(ts, [0] * 8)
    assert strata == [0, 0, 1, 1, 2, 2, 3, 3]
    iid, coll = pooled_results(rows)["mask_delta_se"], pooled_results(rows, strata)["mask_delta_se"]
    # each pair's residuals differ by 2·0.05 − 2σ (b even then odd): Var(Σ) = 4 · (0.1 − 0.02)²
    assert coll == pytest.approx((4 * (0.1 - 2 * sigma) ** 2) ** 0.5 / 8, rel=1e-9)
    assert iid > 3 * coll
    pb = per_batch_results(rows, strata)
    assert pb["mask_delta_se"] == pytest.approx(coll, rel=1e-9)  # equal counts: the same estimate
    with pytest.raises(ValueError, match="at least 2"):
        pooled_results(rows, [0, 0, 1, 1, 2, 2, 3, 4])
    with pytest.raises(ValueError, match="labels"):
        pooled_results(rows, [0, 0])


def test_relative_se_is_the_worst_headline_ratio():
    from dlmscope.analysis.splice import relative_se

    assert relative_se({"mask_delta": 2.0, "mask_delta_se": 0.1, "unmask_delta": -1.0, "unmask_delta_se": 0.3}) \
        == pytest.approx(0.3)
    assert relative_se({"delta": 0.0, "delta_se": 0.1}) == math.inf
    assert math.isnan(relative_se({"delta": 1.0, "delta_se": float("nan")}))


def test_22_5_sequential_delta_lm_stops_each_sae_at_its_se_target(monkeypatch):
    """Known answer: batch b of an SAE with effect e has Δ = e + σ·(−1)^b, so after B batches the pooled Δ is e
    and its SE σ/√(B−1). With σ = 0.1 and a target SE < 0.2·|Δ|: e = 1 stops after the first round (B = 2),
    e = 0.25 after the third (B = 6), e = 0.1 never (all 8 batches, ``se_target_met`` False)."""
    import types

    import dlmscope.analysis.splice as S

    def fake_ar_batch(adapter, by_layer, ids, attention_mask, zero_ablation):
        b = int(ids)
        return {L: [{"clean": 1.0, "sae": 1.0 + sae.e + 0.1 * (-1) ** b, "delta": sae.e + 0.1 * (-1) ** b,
                     "n_tokens": 100} for sae in group] for L, group in by_layer.items()}

    monkeypatch.setattr(S, "_ar_batch", fake_ar_batch)
    saes = [types.SimpleNamespace(e=e) for e in (1.0, 0.25, 0.1)]
    adapter = types.SimpleNamespace(is_diffusion=False, check_layer=lambda layer: layer)
    got = S.delta_loss_over_batches(adapter, saes, 0, list(range(8)), seed=0, target_rel_se=0.2, round_batches=2)
    assert [g["n_batches"] for g in got] == [2, 6, 8]
    assert [g["se_target_met"] for g in got] == [True, True, False]
    for g, e in zip(got, (1.0, 0.25, 0.1)):
        B = g["n_batches"]
        assert g["delta"] == pytest.approx(e) and g["delta_se"] == pytest.approx(0.1 / (B - 1) ** 0.5)
        assert g["rel_se"] == pytest.approx(0.1 / (B - 1) ** 0.5 / e)


def test_22_5_sequential_delta_lm_rounds_share_corruptions(llada, ar):
    """On a real DLM: a first round that satisfies everyone equals a plain run over its batches; an SAE's later
    rounds see the same corruptions whichever other SAEs are still running."""
    batches = [token_batch(seed=s, batch=2, seq=12)[0] for s in range(6)]
    one, two = random_sae(1), random_sae(2)
    loose = delta_loss_over_batches(llada, [one, two], 1, batches, seed=5, target_rel_se=1e9, round_batches=2)
    plain = delta_loss_over_batches(llada, [one, two], 1, batches[:2], seed=5)
    for got, ref in zip(loose, plain):
        assert got["n_batches"] == 2 and got["se_target_met"] and "se_target" not in ref
        assert got["mask_delta"] == pytest.approx(ref["mask_delta"], rel=1e-9)
    tight = delta_loss_over_batches(llada, [one, two], 1, batches, seed=5, target_rel_se=1e-12, round_batches=2)
    alone = delta_loss_over_batches(llada, [two], 1, batches, seed=5, target_rel_se=1e-12, round_batches=2)[0]
    assert tight[1]["n_batches"] == 6 and not tight[1]["se_target_met"]
    assert alone["mask_delta"] == pytest.approx(tight[1]["mask_delta"], rel=1e-9)
    assert alone["unmask_delta"] == pytest.approx(tight[1]["unmask_delta"], rel=1e-9)
    a = delta_loss_over_batches(ar, [one], 1, batches, seed=5, target_rel_se=1e9, round_batches=3)[0]
    assert a["n_batches"] == 3 and a["se_target_met"]
    with pytest.raises(ValueError, match="target_rel_se"):
        delta_loss_over_batches(llada, [one], 1, batches, seed=5, target_rel_se=0.0)


@pytest.mark.parametrize("layer", [0, 1, LAYERS - 1])
def test_22_5_delta_loss_variants_equal_full_forwards(llada, ar, layer):
    """The ΔLM variants replay blocks 0 … L−1 from the clean forward: the losses equal full forwards'."""
    ids = token_batch(seed=3, batch=2, seq=12)[0]
    sae = random_sae(4)
    got = dlm_delta_loss(llada, [sae], layer, ids, generator=torch.Generator().manual_seed(1), t=0.4)[0]
    noisy, masked = corrupt(ids, None, MASK, 0.4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = F.cross_entropy(llada.logits(noisy)[masked], ids[masked])
        with splice(llada, layer, sae):
            spliced = F.cross_entropy(llada.logits(noisy)[masked], ids[masked])
        with zero_ablate(llada, layer):
            zero = F.cross_entropy(llada.logits(noisy)[masked], ids[masked])
    assert got["mask_clean"] == pytest.approx(float(clean) / 0.4, rel=1e-5)
    assert got["mask_sae"] == pytest.approx(float(spliced) / 0.4, rel=1e-5)
    assert got["mask_zero"] == pytest.approx(float(zero) / 0.4, rel=1e-5)
    a = ar_delta_loss(ar, [sae], layer, ids)[0]
    with torch.no_grad(), splice(ar, layer, sae):
        logits = ar.logits(ids)
    assert a["sae"] == pytest.approx(float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())),
                                     rel=1e-5)


@pytest.mark.parametrize("sampling", ["stratified", "iid"])
def test_22_5_delta_loss_by_layer_equals_one_call_per_layer(llada, ar, sampling):
    """Several layers from one clean forward per batch give each layer's own results, sequential rounds too."""
    batches = [token_batch(seed=s, batch=2, seq=12)[0] for s in range(6)]
    saes = {0: [random_sae(1), random_sae(2)], 2: [random_sae(3)], LAYERS - 1: [random_sae(4), random_sae(5)]}
    for model in (llada, ar):
        kw = dict(seed=5, t_sampling=sampling, target_rel_se=0.05, round_batches=2)
        both = delta_loss_by_layer(model, saes, batches, **kw)
        assert sorted(both) == sorted(saes)
        for layer, group in saes.items():
            alone = delta_loss_over_batches(model, group, layer, batches, **kw)
            for got, ref in zip(both[layer], alone):
                assert got == ref
    with pytest.raises(ValueError, match="at least one SAE"):
        delta_loss_by_layer(llada, {1: []}, batches, seed=0)
    with pytest.raises(ValueError):
        delta_loss_by_layer(llada, {99: [random_sae(1)]}, batches, seed=0)
