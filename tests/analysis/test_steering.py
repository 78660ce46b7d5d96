"""dlmscope.analysis.steering: the added vector against its formula, scopes, schedules, and bad arguments."""
from __future__ import annotations

import pytest
import torch

from dlmscope.demo import load_world_model
from dlmscope.sae.topk import TopKSAE
from dlmscope.models.sampling import Progress, llada_generate, publish_progress
from dlmscope.analysis.steering import steer, steering_vectors

LAYER = 3


@pytest.fixture(scope="module")
def sae(dlm):
    torch.manual_seed(0)
    s = TopKSAE(dlm.d_model, 64, 4)
    with torch.no_grad():
        s.b_dec.normal_(0, 0.3)          # a non-zero b_dec: the encoder must subtract it
        s.b_enc.normal_(0, 0.1)
    return s


def _prompt(dlm, text, masks=0):
    tok = dlm.tokenizer
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [dlm.mask_token_id] * masks
    return torch.tensor([ids])


def _block(dlm, ids):
    return dlm.forward_until(ids, [LAYER])[LAYER]


def test_added_vector_is_alpha_times_max_activation_times_unit_decoder_row(dlm, sae):
    ids = _prompt(dlm, "the capital of france is", masks=2)
    h = _block(dlm, ids)
    feats, alpha = [5, 17], [2.0, -0.5]
    with steer(dlm, LAYER, sae, feats, alpha):
        h_steered = _block(dlm, ids)
    m = sae.encode(h)[0].max(-1).values                                   # exact encoder, b_dec subtracted
    ref = sae.W_dec[:, :].detach()[feats]
    v = ref / ref.norm(dim=-1, keepdim=True)
    expected = h + m[..., None] * (torch.tensor(alpha) @ v)
    torch.testing.assert_close(h_steered, expected, rtol=1e-5, atol=1e-5)
    # the hook is gone afterwards
    torch.testing.assert_close(_block(dlm, ids), h)
    # constant strength adds alpha · v everywhere
    with steer(dlm, LAYER, sae, 5, 1.5, strength="constant"):
        torch.testing.assert_close(_block(dlm, ids), h + 1.5 * steering_vectors(sae, [5])[0], rtol=1e-5, atol=1e-5)


def test_masked_scope_and_top_active(dlm, sae):
    ids = _prompt(dlm, "my mother has a", masks=3)
    h = _block(dlm, ids)
    with steer(dlm, LAYER, sae, 7, 3.0, scope="masked"):
        d = (_block(dlm, ids) - h).norm(dim=-1)[0]
    masked = ids[0] == dlm.mask_token_id
    assert (d[~masked] == 0).all() and (d[masked] > 0).all()
    with steer(dlm, LAYER, sae, 7, 3.0, scope="top_active", top_active=2):
        d = (_block(dlm, ids) - h).norm(dim=-1)[0]
    act = torch.relu((h - sae.b_dec) @ sae.W_enc[7] + sae.b_enc[7])[0]
    assert set(torch.nonzero(d > 0).flatten().tolist()) <= set(act.topk(2).indices.tolist())


def test_generation_and_decoded_scopes_follow_the_sampler(dlm, sae):
    ids = torch.cat([_prompt(dlm, "anna wrote a story about"), torch.tensor([[dlm.mask_token_id] * 3])], 1)
    ids[0, -3] = 50                                                       # one generated position decoded
    h = _block(dlm, ids)
    P = ids.shape[1] - 3
    with publish_progress(Progress(1, 3, torch.tensor([P]))):
        for scope, want in (("generation", torch.arange(ids.shape[1]) >= P),
                            ("decoded", torch.arange(ids.shape[1]) == P)):
            with steer(dlm, LAYER, sae, 3, 2.0, scope=scope):
                d = (_block(dlm, ids) - h).norm(dim=-1)[0]
            assert torch.equal(d > 0, want), scope


def test_schedule_picks_denoising_steps(dlm, sae):
    prompt = [_prompt(dlm, "the sky is")[0].tolist()]
    for schedule, steps_on in ((("first", 0.5), [0, 1]), (("last", 0.25), [3]), ([0, 2], [0, 2]),
                               ("all", [0, 1, 2, 3])):
        seen = []

        def record(ids, progress):
            seen.append((progress.step, progress.steps, int(progress.prompt_lengths[0])))
            return torch.ones_like(ids, dtype=torch.bool)

        with steer(dlm, LAYER, sae, 1, 1.0, scope=record, schedule=schedule):
            llada_generate(dlm, prompt, gen_length=4, steps=4)
        assert [s for s, _, _ in seen] == steps_on, schedule
        assert all(n == 4 and p == len(prompt[0]) for _, n, p in seen)


def test_steering_changes_generation_and_leaves_no_trace(dlm, sae):
    prompt = [_prompt(dlm, "anna wrote a story about")[0].tolist()]
    base = llada_generate(dlm, prompt, gen_length=4, steps=4).sequences
    with steer(dlm, LAYER, sae, 2, 5000.0, strength="constant"):   # residual norms here are ~100–800
        pushed = llada_generate(dlm, prompt, gen_length=4, steps=4).sequences
    assert not torch.equal(base, pushed)
    assert torch.equal(llada_generate(dlm, prompt, gen_length=4, steps=4).sequences, base)


def test_bad_arguments_name_the_problem(dlm, sae):
    with pytest.raises(ValueError, match="alpha must be finite"):
        steer(dlm, LAYER, sae, 1, float("nan")).__enter__()
    with pytest.raises(ValueError, match="feature index 64 out of range"):
        steer(dlm, LAYER, sae, [1, 64], 1.0).__enter__()
    with pytest.raises(ValueError, match="does not match the model's hidden size"):
        steer(dlm, LAYER, TopKSAE(dlm.d_model + 1, 8, 2), 1, 1.0).__enter__()
    with pytest.raises(ValueError, match="did you mean 'masked'"):
        steer(dlm, LAYER, sae, 1, 1.0, scope="maskd").__enter__()
    with pytest.raises(ValueError, match="did you mean 'max_act'"):
        steer(dlm, LAYER, sae, 1, 1.0, strength="max_acts").__enter__()
    with pytest.raises(ValueError, match="schedule fraction"):
        steer(dlm, LAYER, sae, 1, 1.0, schedule=("first", 0)).__enter__()
    with pytest.raises(ValueError, match="alpha has 3 values for 2 features"):
        steer(dlm, LAYER, sae, [1, 2], [1.0, 2.0, 3.0]).__enter__()
    with pytest.raises(ValueError, match="layer"):
        steer(dlm, dlm.num_layers, sae, 1, 1.0).__enter__()


def test_steering_score_same_seed_baseline_and_formula(dlm, sae):
    import functools
    import math

    from dlmscope.interp.judges import PlantedJudge
    from dlmscope.analysis.steering import FLUENCY_WEIGHT, generation_perplexity, steering_score
    from dlmscope.world import CONCEPTS

    ar = load_world_model("ar")
    prompts = [_prompt(dlm, t)[0].tolist() for t in ("anna wrote a story about", "ben talked about")]
    gen = functools.partial(llada_generate, gen_length=3, steps=3, temperature=0.7)
    # alpha 0: the steered run is the baseline (same seed), so the score is exactly 0
    r0 = steering_score(dlm, prompts, gen, 3, LAYER, sae, 4, 0.0, "food", PlantedJudge(concepts=CONCEPTS), ar, seed=5)
    assert r0.generations_before == r0.generations_after and r0.score == 0.0 and r0.failed == 0
    r = steering_score(dlm, prompts, gen, 3, LAYER, sae, 4, 3.0, "food", PlantedJudge(concepts=CONCEPTS), ar, seed=5)
    assert r.generations_before == r0.generations_before
    expected = (r.concept_after - r.concept_before) + FLUENCY_WEIGHT * (r.ppl_before - r.ppl_after) / r.ppl_before
    assert math.isclose(r.score, expected)
    # perplexity of a generation given its prompt, by hand
    tok = ar.tokenizer
    p = [tok.bos_token_id] + tok("the sky is", add_special_tokens=False)["input_ids"]
    g = tok("blue .", add_special_tokens=False)["input_ids"]
    logits = ar.logits(torch.tensor([p + g]))[0]
    ce = torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], torch.tensor(g))
    assert generation_perplexity(ar, ["the sky is"], ["blue ."])[0] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    # batched (right-padded, several batches) equals one text at a time; an empty generation is NaN
    ps = ["the sky is", "anna wrote a story about", "ben", "my mother has a"]
    gs = ["blue .", "bread . [EOS] eleven plus", "", "dog ."]
    batched = generation_perplexity(ar, ps, gs, batch_size=2)
    single = [generation_perplexity(ar, [p_], [g_])[0] for p_, g_ in zip(ps, gs)]
    assert math.isnan(batched[2]) and math.isnan(single[2])
    assert [b for i, b in enumerate(batched) if i != 2] == pytest.approx([s for i, s in enumerate(single) if i != 2],
                                                                        rel=1e-5)
    # a baseline computed once gives the same result as one computed inside the call
    from dlmscope.analysis.steering import steering_baseline
    base = steering_baseline(dlm, prompts, gen, 3, ar, seed=5)
    assert steering_score(dlm, prompts, gen, 3, LAYER, sae, 4, 3.0, "food", PlantedJudge(concepts=CONCEPTS), ar, seed=5,
                          baseline=base) == r
    with pytest.raises(ValueError, match="seed 5"):
        steering_score(dlm, prompts, gen, 3, LAYER, sae, 4, 3.0, "food", PlantedJudge(concepts=CONCEPTS), ar, seed=6,
                       baseline=base)


def test_cli_steer_writes_a_sweep(dlm, sae, tmp_path, capsys):
    import json
    import os

    from dlmscope import cli
    from dlmscope.world import ASSETS_DIR

    sae_dir = tmp_path / "sae"
    sae.save(sae_dir)
    model = os.path.join(ASSETS_DIR, "models", "dlm")
    base = ["steer", "--model", model, "--sae", str(sae_dir), "--layer", str(LAYER), "--n-prompts", "4",
            "--gen-length", "4", "--steps", "4", "--out", str(tmp_path / "out")]
    assert cli.main(base + ["--features", "5", "--judge-concept", "food", "--alpha", "0", "3",
                            "--schedule", "first:0.5"]) == 0
    result = json.loads((tmp_path / "out" / "steer.json").read_text())
    sweep = result["features"]["food/5"]["sweep"]
    assert [p["alpha"] for p in sweep] == [0.0, 3.0] and sweep[0]["score"] == 0.0
    assert sweep[0]["concept_delta"]["mean"] == 0.0 and sweep[0]["schedule"] == ["first", 0.5]
    assert result["n_prompts"] == 4 and (tmp_path / "out" / "steer.png").stat().st_size > 1000
    # issue 22: intervals say what they are over; controls, composite, norm ratio, matched fluency, fluency judge
    assert sweep[1]["concept_delta"]["over"] == {"prompts": 4}                    # one feature: over prompts
    assert set(sweep[1]["controls"]) == {"random_latent", "random_direction"}
    row = result["summary"]["rows"][1]
    assert row["concept_delta"]["over"] == {"concepts": 1, "prompts": 4}          # one concept: no width from it
    assert row["composite_fluency_term"] == "log_ratio" and row["composite"]["over"] == row["concept_delta"]["over"]
    for kind in ("random_latent", "random_direction"):
        assert row["controlled"][kind]["over"] == row["concept_delta"]["over"]
        assert row["controls"][kind]["norm_ratio"] == pytest.approx(row["norm_ratio"], rel=0.5)
    assert row["norm_ratio"] > 0 and result["summary"]["rows"][0]["norm_ratio"] == 0.0     # α 0: nothing added
    assert result["summary"]["matched_fluency"][0]["max_ppl_ratio"] == 2.0
    assert result["summary"]["matched_fluency"][0]["alpha"] in (3.0, None)        # α 0 steers nothing: not a gain
    assert result["controls"]["latents"] and result["controls"]["latents"][0] != 5
    assert result["fluency"]["independent"] is False and "neither twin" in result["fluency"]["why"]
    # two scopes × two schedules, and the AR twin at matched α on the same concept
    ar_sae = tmp_path / "ar_sae"
    TopKSAE(dlm.d_model, 64, 4).save(ar_sae)
    assert cli.main(base + ["--concepts", "food", "--alpha", "2", "--scope", "all", "masked", "--schedule", "all",
                            "last:0.5", "--compare-model", os.path.join(ASSETS_DIR, "models", "ar"),
                            "--compare-sae", str(ar_sae), "--controls", "random_latent"]) == 0
    result = json.loads((tmp_path / "out" / "steer.json").read_text())
    assert list(result["features"])[0].startswith("food/")
    rows = result["summary"]["rows"]
    assert [(r["scope"], r["schedule"]) for r in rows] == [("all", "all"), ("all", ["last", 0.5]),
                                                           ("masked", "all"), ("masked", ["last", 0.5])]
    compare = json.loads((tmp_path / "out" / "steer_compare.json").read_text())
    assert result["summary"]["rows"][0]["concept_delta"]["over"] == {"concepts": 1, "prompts": 4}
    assert compare["spec"]["sampler"] == "ar" and compare["spec"]["alphas"] == [2.0]
    assert compare["spec"]["scopes"] == ["all"]                       # no masked positions in an AR model
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 1000
    cells = compare["comparison"]
    assert [(c["scope"], c["schedule"], c["alpha"]) for c in cells] == [("all", "all", 2.0),
                                                                         ("all", ["last", 0.5], 2.0)]
    for c in cells:
        assert c["verdict"] in ("DLM", "AR", "no difference") and c["names"] == ["DLM", "AR"]
        assert c["over"] == {"concepts": 1, "prompts": 4} and c["low"] <= c["mean"] <= c["high"]
        assert c["composite_verdict"] in ("DLM", "AR", "no difference") and set(c["norm_ratio"]) == {"DLM", "AR"}
        assert set(c["score_paper"]) == {"DLM", "AR", "difference"} and "random_latent" in c["effect"]
    assert compare["fluency"]["independent"] is False                  # the AR twin judged its own fluency
    out = capsys.readouterr().out
    assert "over concepts × prompts" in out and "DLM − AR" in out and "controlled" in out
    capsys.readouterr()
    assert cli.main(base + ["--features", "5"]) == 2
    assert "--judge-concept" in capsys.readouterr().err
    assert cli.main(base + ["--features", "5", "--judge-concept", "food", "--schedule", "frist:0.1"]) == 2
    assert "--schedule" in capsys.readouterr().err


# ---- issue 22: the record of ‖α·m(h)·v‖/‖h‖, a given direction, and the sweep's statistics on known answers -----
def test_22_3_record_gives_the_norm_ratio_and_directions_replace_the_decoder_rows(dlm, sae):
    from dlmscope.analysis.steering import norm_ratio, random_directions

    ids = _prompt(dlm, "the capital of france is", masks=2)
    h = _block(dlm, ids)
    m = sae.encode(h)[0].max(-1).values.clamp_min(0).detach()                           # [1, T]
    record = []
    with steer(dlm, LAYER, sae, 5, 2.5, record=record):
        _block(dlm, ids)
    assert norm_ratio(record) == pytest.approx(float((2.5 * m).sum() / h.detach().norm(dim=-1).sum()), rel=1e-4)
    # a ratio of totals: a position whose ‖h‖ is ~0 (padding) adds its small ‖added‖ and cannot blow it up
    assert norm_ratio([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1e-20])]) == pytest.approx(2.0)
    # a random direction at the same α: the same norm at every position (matched by construction), another vector
    v = random_directions(dlm.d_model, 1, seed=3)
    assert v.norm(dim=-1).item() == pytest.approx(1.0)
    record_dir = []
    with steer(dlm, LAYER, sae, 5, 2.5, directions=3 * v, record=record_dir):
        h_dir = _block(dlm, ids)
    torch.testing.assert_close(h_dir, h + 2.5 * m[..., None] * v[0], rtol=1e-5, atol=1e-5)
    assert norm_ratio(record_dir) == pytest.approx(norm_ratio(record), rel=1e-5)
    # a random latent at the same α: the same norm too (m(h) is the largest activation over all latents)
    record_lat = []
    with steer(dlm, LAYER, sae, 40, 2.5, record=record_lat):
        _block(dlm, ids)
    assert norm_ratio(record_lat) == pytest.approx(norm_ratio(record), rel=1e-5)
    with pytest.raises(ValueError, match="directions has 2 rows for 1 features"):
        steer(dlm, LAYER, sae, 5, 1.0, directions=torch.randn(2, dlm.d_model)).__enter__()


def _runs(deltas, *, before=0.2, ppl_after=None, control=None, alpha=1.0, seed=0):
    """Runs ``[G]`` of a sweep at one condition from concept-rate changes ``deltas [G, U]`` (a float tensor);
    ``control [G, U]``: a random-latent control's changes."""
    G, U = deltas.shape
    ppl_after = torch.full((G, U), 10.0) if ppl_after is None else ppl_after
    runs = []
    for g in range(G):
        run = {"scope": "all", "schedule": "all", "alpha": alpha, "concepts_before": [before] * U,
               "concepts_after": (before + deltas[g]).tolist(), "ppls_before": [10.0] * U,
               "ppls_after": ppl_after[g].tolist(), "score": 0.0, "norm_ratio": 0.5}
        if control is not None:
            run["controls"] = {"random_latent": {"concepts_after": (before + control[g]).tolist(),
                                                 "ppls_after": [10.0] * U, "norm_ratio": 0.5}}
        runs.append(run)
    return runs


def test_22_1_pooled_interval_is_over_concepts_and_covers_zero_when_only_prompts_are_many():
    from dlmscope.analysis.steering_stats import summarise_condition
    from dlmscope.util.bootstrap import paired_difference

    gen = torch.Generator().manual_seed(0)
    concept_effect = torch.tensor([0.6, 0.5, 0.4, -0.3, -0.4, -0.5])      # the concepts' mean: 0.05, spread 0.45
    deltas = concept_effect[:, None] + 0.02 * torch.randn(6, 80, generator=gen)
    row = summarise_condition(_runs(deltas), [f"c{i}" for i in range(6)])
    ci = row["concept_delta"]
    assert ci["over"] == {"concepts": 6, "prompts": 80} and row["feature_axis"] == "concepts"
    assert ci["low"] < 0 < ci["high"]                                    # the claim about features: not shown
    # the same numbers with the concepts held fixed (prompts resampled only) exclude 0: the wrong unit
    old = paired_difference(torch.zeros_like(deltas), deltas, seed=0)
    assert old.low > 0 and old.over == {"units": 80}
    assert row["features_up"] == 3                                      # per feature (over prompts): the 3 up
    # the same concept steered with several latents: the axis is named latents
    assert summarise_condition(_runs(deltas[:2]), ["food", "food"])["concept_delta"]["over"] == {"latents": 2,
                                                                                                "prompts": 80}


def test_22_3_a_control_that_moves_the_concept_as_much_leaves_no_controlled_effect():
    from dlmscope.analysis.steering_stats import summarise_condition

    gen = torch.Generator().manual_seed(1)
    steered = 0.4 + 0.1 * torch.randn(5, 30, generator=gen)
    control = steered + 0.01 * torch.randn(5, 30, generator=gen)      # a random latent raises it just as much
    row = summarise_condition(_runs(steered, control=control), list("abcde"))
    assert row["concept_delta"]["low"] > 0.3                           # the steered change alone looks real
    controlled = row["controlled"]["random_latent"]
    assert abs(controlled["mean"]) < 0.01 and controlled["low"] < 0 < controlled["high"]
    assert controlled["over"] == {"concepts": 5, "prompts": 30}
    assert row["controls"]["random_latent"]["concept_delta"]["mean"] == pytest.approx(row["concept_delta"]["mean"],
                                                                                       abs=0.01)
    # a control that does nothing leaves the steered effect whole
    row = summarise_condition(_runs(steered, control=torch.zeros_like(steered)), list("abcde"))
    assert row["controlled"]["random_latent"]["mean"] == pytest.approx(row["concept_delta"]["mean"])


def test_22_3_composite_and_paper_score_on_hand_built_numbers():
    import math

    from dlmscope.analysis.steering_stats import composite_cells, paper_score, summarise_condition

    cells = composite_cells([[0.1, 0.2]], [[0.5, 0.4]], [[10.0, 20.0]], [[20.0, 20.0]])
    assert cells[0] == pytest.approx([0.4 - 0.3 * math.log(2), 0.2])
    # the paper's score on prompt means: (0.45 − 0.15) + 0.3 · (15 − 20) / 15
    assert paper_score(0.15, 0.45, 15.0, 20.0) == pytest.approx(0.2)
    # one exploded perplexity (×670): the paper's mean-based term collapses, the log-ratio term stays bounded
    assert paper_score(0.0, 0.5, 10.0, (10 + 6700) / 2) < -90
    assert composite_cells([[0.0, 0.0]], [[0.5, 0.5]], [[10.0, 10.0]], [[10.0, 6700.0]])[0][1] == pytest.approx(
        0.5 - 0.3 * math.log(670))
    # an empty generation (NaN perplexity) drops its cell; the row names its fluency term
    assert math.isnan(composite_cells([[0.0]], [[0.5]], [[10.0]], [[float("nan")]])[0][0])
    row = summarise_condition(_runs(torch.full((2, 4), 0.3), ppl_after=torch.full((2, 4), 20.0)), ["a", "b"])
    assert row["composite_fluency_term"] == "log_ratio"
    assert row["composite"]["mean"] == pytest.approx(0.3 - 0.3 * math.log(2))
    assert row["ppl_ratio_median"] == pytest.approx(2.0) and row["norm_ratio"] == pytest.approx(0.5)


def test_22_3_matched_fluency_picks_the_best_alpha_that_keeps_fluency():
    from dlmscope.analysis.steering_stats import matched_fluency

    def row(alpha, gain, ratio, scope="all"):
        return {"scope": scope, "schedule": "all", "alpha": alpha, "ppl_ratio_median": ratio,
                "concept_delta": {"mean": gain, "low": gain - 0.1, "high": gain + 0.1}}

    rows = [row(1.0, 0.1, 1.1), row(2.0, 0.3, 1.9), row(4.0, 0.6, 5.0), row(8.0, 0.9, None),
            row(1.0, 0.2, 1.0, "masked"), row(2.0, 0.2, 1.5, "masked"), row(4.0, 0.5, 3.0, "masked")]
    best = matched_fluency(rows)
    assert [(b["scope"], b["alpha"]) for b in best] == [("all", 2.0), ("masked", 1.0)]   # a tie: the smaller α
    assert best[0]["concept_delta"]["mean"] == 0.3 and best[0]["max_ppl_ratio"] == 2.0
    assert matched_fluency([row(4.0, 0.6, 5.0)])[0]["alpha"] is None                    # no α keeps fluency
    assert matched_fluency([row(0.0, 0.0, 1.0), row(4.0, -0.1, 1.0)])[0]["alpha"] == 4.0  # α 0 is not a steer
    assert matched_fluency(rows, max_ratio=10.0)[0]["alpha"] == 4.0


def test_22_3_verdict_follows_the_prespecified_rule():
    from dlmscope.analysis.steering_stats import verdict

    assert verdict({"mean": 0.2, "low": 0.1, "high": 0.3}) == "DLM"
    assert verdict({"mean": -0.2, "low": -0.3, "high": -0.1}) == "AR"
    assert verdict({"mean": 0.2, "low": -0.01, "high": 0.3}) == "no difference"
    assert verdict({"mean": None, "low": None, "high": None}) is None and verdict(None) is None
    assert verdict({"mean": 0.2, "low": 0.1, "high": 0.3}, ("model", "compare")) == "model"
