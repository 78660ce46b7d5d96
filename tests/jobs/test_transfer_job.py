"""The base → instruct transfer job (dlmscope.jobs.transfer): its refusals of bad input, one small run on the
embedded world's base / instruct / AR models, given SAEs, and the ``dlmscope transfer`` command."""
from __future__ import annotations

import json

import pytest
import torch

from dlmscope.sae.topk import TopKSAE
from dlmscope.train.trainer import TrainConfig
from dlmscope.analysis.transfer import compare_layer, paired_activations
from dlmscope.jobs.plots import plot_transfer
from dlmscope.jobs.transfer import run_transfer, summary_lines, world_qa_batches

from tests.helpers.saes import random_biased_sae as random_sae

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_TRAIN = TrainConfig(lr=1e-3, warmup_steps=2, norm_batches=2, dead_tokens=4_000)


# ------------------------------------------------------------------------------------------------ bad input
def test_run_transfer_refuses_bad_layers_and_mismatched_saes(world):
    base, inst, _, batches = world
    with pytest.raises(ValueError, match=r"layer 99 out of range .* valid layers are 0\.\.7"):
        run_transfer(base, inst, [99], batches=batches)
    with pytest.raises(ValueError, match=r"base_saes\[1\] has d=32 but the model's hidden size is d_model=128"):
        run_transfer(base, inst, [1], base_saes={1: random_sae(0)}, batches=batches)
    with pytest.raises(ValueError, match=r"instruct_saes\[1\] has n=48 latents but n_latents=64"):
        run_transfer(base, inst, [1], n_latents=64, instruct_saes={1: random_sae(0, d=128)}, batches=batches)
    with pytest.raises(ValueError, match=r"base_saes has no SAE for layer 2"):
        run_transfer(base, inst, [1, 2], n_latents=48, k=4, base_saes={1: random_sae(0, d=128)}, batches=batches)
    with pytest.raises(ValueError, match=r"base_saes\[1\] has k=4 but k=8"):
        run_transfer(base, inst, [1], n_latents=48, base_saes={1: random_sae(0, d=128)}, batches=batches)
    with pytest.raises(ValueError, match=r"no SAE with k=8 \(ks \[4\]\)"):
        run_transfer(base, inst, [1], n_latents=48, base_saes={1: [random_sae(0, d=128)]}, batches=batches)
    with pytest.raises(ValueError, match=r"unknown mask policy"):
        run_transfer(base, inst, [1], policy="unmasked", batches=batches)


# --------------------------------------------------------------------------------------- the world models
def test_run_transfer_end_to_end_on_the_world_models(world, tmp_path):
    base, inst, ar, batches = world
    L = 2
    qa = world_qa_batches(base.tokenizer, samples=200, seq_len=64, lm_batch=8)
    result = run_transfer(base, inst, [L], n_latents=64, k=4, train_tokens=3_000, eval_tokens=1_000,
                          delta_batches=2, control=ar, batches=batches, own_batches=qa, train=TINY_TRAIN,
                          sae_batch=256, resamples=200)
    assert json.loads(json.dumps(result)) is not None and result["config"]["cosine"] == "signed"
    assert result["config"]["ceiling"] and result["config"]["own_text"]
    entries = result["layers"][str(L)]
    assert list(result["layers"]) == [str(L)] and set(entries) == {"instruct", "instruct_own_text", "control"}
    for name, e in entries.items():
        for cond in ("base_on_base", "base_on_target", "target_on_target"):
            assert e["fve"][cond]["fve"] <= 1.0 and e["fve"][cond]["n_tokens"] == 1_000
            assert e["fve"][cond]["l0"] == pytest.approx(4.0)
        assert 0.0 <= e["alive"]["jaccard"] <= 1.0 and e["alive"]["n_latents"] == 64
        assert -1.0 <= e["correlation"]["median"] <= 1.0
        for key in ("decoder", "decoder_chance"):
            assert all(0.0 <= v <= 1.0 for k, v in e[key].items() if "frac" in k or k == "identity_fraction")
            assert -1.0 <= e[key]["hungarian_mean"] <= e[key]["max_cos_mean"] + 1e-6 <= 1.0 + 1e-6
        # every SAE has its own init seed: no shared start to report
        assert "decoder_init" not in e and e["decoder"]["identity_fraction"] < 0.5
        assert e["verdict"]["outcome"] in ("consistent", "below_ceiling", "at_null")
        assert "reproduced" not in e["verdict"]["words"]
        assert set(e["delta"]) == ({"base_in_base", "base_in_target", "target_in_target"} if name != "control"
                                   else {"base_in_target", "target_in_target"})
    # the ceiling compares the base SAE with the second base SAE: the same whatever the target
    assert entries["instruct"]["ceiling"]["decoder"] == entries["control"]["ceiling"]["decoder"]
    assert entries["instruct_own_text"]["fve"] != entries["instruct"]["fve"]  # other text, other numbers
    inst_delta = entries["instruct"]["delta"]["base_in_target"]
    assert inst_delta["n_masked"] > 0 and inst_delta["mask_zero"] > inst_delta["mask_clean"]
    assert inst_delta["estimator"] == "pooled" and "per_batch" in inst_delta
    assert "recovered" in entries["control"]["delta"]["base_in_target"]  # AR: next-token CE
    s = result["summary"][str(L)]
    assert s["fve_ratio"] == pytest.approx(s["fve_base_on_target"] / s["fve_target_on_target"])
    assert "control_hungarian_mean" in s and "init_hungarian_mean" not in s
    for pre in ("", "own_", "control_"):
        assert s[f"{pre}verdict"] == entries[{"": "instruct", "own_": "instruct_own_text",
                                              "control_": "control"}[pre]]["verdict"]["outcome"]
        assert {f"{pre}ceiling_fve_ratio", f"{pre}null_fve_ratio", f"{pre}matched_corr_median"} <= set(s)
    lines = summary_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"layer {L}:") and "AR control" in lines[0]
    assert "seed-to-seed ceiling" in lines[0] and "own text" in lines[0]
    path = plot_transfer(result, tmp_path / "transfer.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_run_transfer_shared_init_reports_the_start_and_no_ceiling(world):
    base, inst, _, batches = world
    L = 2
    result = run_transfer(base, inst, [L], n_latents=64, k=4, train_tokens=3_000, eval_tokens=500,
                          delta_batches=1, batches=batches, train=TINY_TRAIN, sae_batch=256, target_init_seed=0,
                          ceiling=False)
    e = result["layers"][str(L)]["instruct"]
    assert "decoder_init" in e and "ceiling" not in e and "verdict" not in result["summary"][str(L)]
    # both SAEs started from one init: they match each other far better than chance
    assert e["decoder"]["hungarian_mean"] > e["decoder_chance"]["hungarian_mean"] + 0.3
    assert "seed-to-seed" not in summary_lines(result)[0]


def test_run_transfer_over_seed_replicates_judges_the_fve_ratio_over_them(world):
    base, inst, _, batches = world
    L = 2
    kw = dict(n_latents=64, k=4, train_tokens=3_000, eval_tokens=500, delta_batches=1, batches=batches,
              train=TINY_TRAIN, sae_batch=256, resamples=100)
    one = run_transfer(base, inst, [L], **kw)
    three = run_transfer(base, inst, [L], seeds=3, **kw)
    assert three["config"]["seeds"] == 3
    e1, e3 = one["layers"][str(L)]["instruct"], three["layers"][str(L)]["instruct"]
    # replicate 0 is the single-seed run's SAEs (trained beside the others on the same harvest)
    assert e3["fve"]["ratio"] == pytest.approx(e1["fve"]["ratio"], rel=1e-4)
    fr = e3["verdict"]["measures"]["fve_ratio"]
    assert fr["seeds"] == 3 and len(fr["per_seed"]) == 3 and fr["over_seeds"]["ratio"]["n"] == 3
    assert fr["over_seeds"]["ratio"]["values"][0] == pytest.approx(e1["fve"]["ratio"], rel=1e-4)
    assert len(set(fr["over_seeds"]["ratio"]["values"])) == 3  # each replicate its own SAEs
    assert e3["verdict"]["outcome"] in ("consistent", "below_ceiling", "at_null")
    s = three["summary"][str(L)]
    assert s["seeds"] == 3 and s["fve_ratio_seeds_low"] <= s["fve_ratio_seeds_mean"] <= s["fve_ratio_seeds_high"]
    assert "over 3 seed replicates" in summary_lines(three)[0]
    with pytest.raises(ValueError, match="seeds > 1"):
        run_transfer(base, inst, [L], seeds=2, ceiling=False, **kw)
    with pytest.raises(ValueError, match="seeds must be"):
        run_transfer(base, inst, [L], seeds=0, **kw)


def test_run_transfer_with_given_saes_trains_nothing(world):
    base, inst, _, (train, held) = world
    L = 1
    given = {m: TopKSAE(128, 64, 4, generator=torch.Generator().manual_seed(i)) for i, m in enumerate(("b", "i"))}
    # a list per layer, as the demo's k sweep gives: the k=4 SAE is picked; no train batches are needed
    result = run_transfer(base, inst, [L], n_latents=64, k=4, eval_tokens=300, delta_batches=1,
                          base_saes={L: [TopKSAE(128, 64, 8), given["b"]]}, instruct_saes={L: given["i"]},
                          second_base_saes={L: TopKSAE(128, 64, 4, generator=torch.Generator().manual_seed(5))},
                          batches=([], held), resamples=200)
    e = result["layers"][str(L)]["instruct"]
    assert "decoder_init" not in e and "init_hungarian_mean" not in result["summary"][str(L)]  # init unknown
    direct = compare_layer(given["b"], given["i"],
                           *(acts[L] for acts in paired_activations(base, inst, held, [L], "unmask", tokens=300)))
    assert e["fve"] == direct["fve"] and e["decoder"] == direct["decoder"]
    assert e["decoder"]["hungarian_mean"] < 0.5  # two independent random SAEs: chance level
    assert "ceiling" in e and e["verdict"]["outcome"] == "at_null"  # random SAEs agree no better than chance


def test_cli_transfer(tmp_path, capsys):
    import json
    import os

    from dlmscope import cli
    from dlmscope.world import ASSETS_DIR

    m = lambda name: os.path.join(ASSETS_DIR, "models", name)  # noqa: E731
    rc = cli.main(["transfer", "--base", m("dlm"), "--target", m("instruct"), "--layers", "2", "--n", "64",
                   "--k", "4", "--tokens", "4000", "--eval-tokens", "1000", "--delta-batches", "1",
                   "--sentences", "3000", "--own-corpus", "world-qa", "--no-ceiling", "--out", str(tmp_path / "t")])
    assert rc == 0
    result = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert list(result["summary"]) == ["2"] and (tmp_path / "t" / "transfer.png").stat().st_size > 1000
    assert set(result["layers"]["2"]) == {"instruct", "instruct_own_text"} and not result["config"]["ceiling"]
    assert "layer 2: base SAE on instruct keeps" in capsys.readouterr().out
    assert cli.main(["transfer", "--base", m("dlm"), "--target", m("instruct"), "--layers", "9",
                     "--out", str(tmp_path / "t")]) == 2
    assert "layer" in capsys.readouterr().err
    assert cli.main(["transfer", "--base", m("dlm"), "--target", m("instruct"), "--layers", "2", "--seeds", "2",
                     "--no-ceiling", "--out", str(tmp_path / "t")]) == 2  # refused before any training
    assert "seeds > 1" in capsys.readouterr().err
