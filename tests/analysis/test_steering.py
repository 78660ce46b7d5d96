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
    for schedule, steps_on in ((("first", 0.5), [0, 1]), (("last", 0.25), [3]), ([0, 2], [0, 2]), ("all", [0, 1, 2, 3])):
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
    # two scopes × two schedules, and the AR twin at matched α on the same concept
    ar_sae = tmp_path / "ar_sae"
    TopKSAE(dlm.d_model, 64, 4).save(ar_sae)
    assert cli.main(base + ["--concepts", "food", "--alpha", "2", "--scope", "all", "masked", "--schedule", "all",
                            "last:0.5", "--compare-model", os.path.join(ASSETS_DIR, "models", "ar"),
                            "--compare-sae", str(ar_sae)]) == 0
    result = json.loads((tmp_path / "out" / "steer.json").read_text())
    assert list(result["features"])[0].startswith("food/")
    rows = result["summary"]["rows"]
    assert [(r["scope"], r["schedule"]) for r in rows] == [("all", "all"), ("all", ["last", 0.5]),
                                                           ("masked", "all"), ("masked", ["last", 0.5])]
    compare = json.loads((tmp_path / "out" / "steer_compare.json").read_text())
    assert compare["spec"]["sampler"] == "ar" and compare["spec"]["alphas"] == [2.0]
    assert compare["spec"]["scopes"] == ["all"]                       # no masked positions in an AR model
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 1000
    capsys.readouterr()
    assert cli.main(base + ["--features", "5"]) == 2
    assert "--judge-concept" in capsys.readouterr().err
    assert cli.main(base + ["--features", "5", "--judge-concept", "food", "--schedule", "frist:0.1"]) == 2
    assert "--schedule" in capsys.readouterr().err
