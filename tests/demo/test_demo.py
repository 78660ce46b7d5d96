"""`make demo` end to end on a miniature setting: results, plots, report, findings; and the CLI entry."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

import dlmscope

from dlmscope import cli
from dlmscope.analysis.order import conjecture_verdict
from dlmscope.demo import RUNS, DemoConfig, findings, load_world_model, run_demo
from dlmscope.demo.report import write_report
from dlmscope.demo.seeds import seed_summary
from dlmscope.util.bootstrap import spread
from dlmscope.jobs.order import ORDERS
from dlmscope.util import atomic

TINY = DemoConfig(layers=(0, 3), ks=(4, 8), k_ref=8, n_latents=128, train_tokens=6_000, eval_tokens=2_000,
                  delta_batches=2, delta_max_batches=4, concept_batches=2, sentences=6_000, sae_batch=512, warmup_steps=2,
                  norm_batches=2, dead_tokens=4_000, steer_layers=(3,), steer_prompts=4, steer_gen=4,
                  order_layers=(0, 3), order_tasks=4, order_seeds=(0,), transfer_layers=(3,), transfer_tokens=6_000,
                  transfer_eval_tokens=2_000, transfer_delta_batches=1, crosscoder_layers=(3,), crosscoder_tokens=6_000,
                  crosscoder_eval_tokens=1_000, crosscoder_epochs=1, crosscoder_seeds=2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, TINY)


def test_results_cover_every_run_layer_and_k(demo_run):
    out, results = demo_run
    assert json.loads((out / "results.json").read_text())["findings"] == atomic.nan_to_null(results["findings"])
    for model, policy in RUNS:
        run = results["runs"][f"{model}/{policy}"]
        assert sorted(run) == ["0", "3"]
        for layer in run.values():
            assert sorted(layer, key=int) == ["4", "8"]
            for k, e in layer.items():
                assert 0.0 < e["fve"] <= 1.0 and e["l0"] == pytest.approx(int(k), abs=1e-6)
                assert e["n_tokens"] == TINY.eval_tokens
                d = e["delta"]
                if model == "dlm":
                    assert d["mask_delta"] == pytest.approx(d["mask_sae"] - d["mask_clean"])
                    assert d["n_masked"] > 0 and math.isfinite(d["mask_recovered"])
                    # zero-ablating a block hurts more than any trained SAE
                    assert d["mask_zero"] > d["mask_clean"]
                else:
                    assert d["delta"] == pytest.approx(d["sae"] - d["clean"]) and d["zero"] > d["clean"]
                c = e["concepts_clean"]
                assert set(c["concepts"]) == {"colour", "animal", "number", "place", "positive", "negative",
                                              "family", "food", "weather", "time"}
                assert 0.0 <= c["median_f1"] <= 1.0
                assert ("concepts_masked" in e) == (model == "dlm")
                if model == "dlm":
                    assert d["mask_delta_se"] >= 0.0
                # ΔLM in rounds of 2 batches up to 4, until SE < 0.1·|Δ|; whether it got there is stored
                assert d["n_batches"] in (2, 4) and d["se_target"] == 0.1
                assert d["se_target_met"] == (d["rel_se"] < 0.1) and (d["n_batches"] == 4 or d["se_target_met"])
    base = results["concept_baselines"]
    assert set(base) == {f"{m}/{p}" for m, p in RUNS} and set(base["dlm/mask"]["0"]) == {"concepts_clean",
                                                                                          "concepts_masked"}
    assert set(base["ar/clean"]["0"]) == {"concepts_clean"}
    for run in base.values():
        for layer in run.values():
            for v in layer.values():   # five random SAEs with the trained b_dec, and the best single dimension
                r = v["random_sae"]["median_f1"]
                assert len(r["values"]) == 5 and 0.0 <= r["low"] <= r["mean"] <= r["high"] <= 1.0
                assert 0.0 <= v["best_dimension"]["median_f1"] <= 1.0
    # SAE seeds: the k sweep's SAE at k_ref and two more init seeds, each evaluated and flagged
    assert results["sae_seeds"]["init_seeds"] == [0, 1, 2] and results["sae_seeds"]["k"] == 8
    for model, policy in RUNS:
        for layer in ("0", "3"):
            extra = results["seed_runs"][f"{model}/{policy}"][layer]
            assert sorted(extra) == ["1", "2"]
            for seed, e in extra.items():
                assert e["init_seed"] == int(seed) and 0.0 < e["fve"] <= 1.0 and "failed" in e
                assert e["fve"] != results["runs"][f"{model}/{policy}"][layer]["8"]["fve"]   # another start
    seeds = results["findings"]["seeds"]
    assert seeds["init_seeds"] == [0, 1, 2] and set(seeds["gaps"]) == {
        "mask_minus_unmask", "unmask_minus_ar", "mask_minus_ar", "unmask_minus_ar_matched", "mask_minus_ar_matched"}
    assert all("failed" in e for run in results["runs"].values() for layer in run.values() for e in layer.values())
    # the SAEs are saved and load back
    from dlmscope.sae.topk import TopKSAE

    sae = TopKSAE.load(out / "saes" / "dlm_mask" / "layer_3" / "k_8")
    assert (sae.d, sae.n, sae.k) == (128, 128, 8) and sae.cfg.meta["policy"] == "mask"
    other = TopKSAE.load(out / "saes" / "dlm_mask" / "layer_3" / "k_8_seed_2")
    assert other.k == 8 and other.cfg.meta["init_seed"] == 2 and sae.cfg.meta["init_seed"] == 0


def test_plots_and_report(demo_run):
    out, results = demo_run
    for name in ("fve_vs_k.png", "delta_lm.png", "concept_f1.png", "steering.png", "order_accuracy.png",
                 "order_dynamics.png", "order_progress.png", "transfer.png", "crosscoder.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    report = (out / "report.md").read_text()
    for heading in ("## Reconstruction", "## Splice-in", "## Planted concepts", "## Steering during generation",
                    "## Decoding orders", "## Base → instruct transfer", "## Crosscoder diff",
                    "## The paper's findings"):
        assert heading in report
    for name in ("fve_vs_k.png", "delta_lm.png", "concept_f1.png", "steering.png", "order_accuracy.png",
                 "transfer.png", "crosscoder.png"):
        assert f"]({name})" in report
    # every FVE in the table is the one in results.json
    fve = results["runs"]["dlm/unmask"]["3"]["8"]["fve"]
    assert f"{fve:.3f}" in report
    f = results["findings"]
    verdicts = ("**reproduced**", "**not reproduced**", "**not testable here**", "**partly reproduced**",
                "**consistent with the claim**", "**partly consistent with the claim**")
    # one verdict per claim, and claims 3 and 4 once per AR twin (the init twin and the budget-matched one)
    assert sum(report.count(v) for v in verdicts) == 8
    assert isinstance(f["mask_vs_unmask"]["reproduced"], bool)
    assert f["mask_vs_unmask"]["pairs_all"] == 4 and 0 <= f["mask_vs_unmask"]["mask_worse"] <= 4
    # every interval names its unit, the controls and the paper's metric stand beside the effect
    for text in ("concepts × prompts", "random latent", "paper's score", "Pre-specified", "Post hoc", "ceiling",
                 "own Q&A", "pooled estimator", "best dimension", "init seeds"):
        assert text in report, text
    assert "paired over prompts" not in report and "≥ 0.9" not in report and "shared initialisation" not in report
    assert not (out / "cache").exists()  # the scratch activation cache is removed


def _healthy(fake):
    """Every SAE of a fake results dict marked as not failed."""
    for by_run in (fake["runs"], fake["seed_runs"]):
        for run in by_run.values():
            for layer in run.values():
                for e in layer.values():
                    e["failed"] = None


def test_findings_follow_the_numbers(demo_run):
    _, results = demo_run
    fake = json.loads(json.dumps(results))
    _healthy(fake)
    for layer in ("0", "3"):
        for seed in ("1", "2"):
            fake["seed_runs"]["dlm/mask"][layer][seed]["fve"] = 0.55
            fake["seed_runs"]["dlm/unmask"][layer][seed]["fve"] = 0.85
        for k in ("4", "8"):
            fake["runs"]["dlm/mask"][layer][k]["fve"] = 0.5
            fake["runs"]["dlm/unmask"][layer][k]["fve"] = 0.9
            for key in ("dlm/mask", "dlm/unmask"):
                fake["runs"][key][layer][k]["delta"]["mask_delta"] = -0.1 if layer == "0" else 0.2
                fake["runs"][key][layer][k]["delta"]["mask_delta_se"] = 0.01
            fake["runs"]["ar/clean"][layer][k]["delta"]["delta"] = 0.3
            fake["runs"]["ar_matched/clean"][layer][k]["delta"]["delta"] = -0.3   # the matched twin: negative
            fake["runs"]["ar_matched/clean"][layer][k]["delta"]["delta_se"] = 0.01
    f = findings(fake, TINY)
    assert f["mask_vs_unmask"]["reproduced"] and f["mask_vs_unmask"]["mean_gap"] == pytest.approx(-0.4)
    seeds = f["mask_vs_unmask"]["seeds"]      # per seed the mean gap over layers: −0.4, −0.3, −0.3
    assert seeds["mean"] == pytest.approx(-1 / 3) and (seeds["low"], seeds["high"]) == pytest.approx((-0.4, -0.3))
    # one seed with the opposite sign: the sign is within seed noise, not reproduced
    flipped = json.loads(json.dumps(fake))
    for layer in ("0", "3"):
        flipped["seed_runs"]["dlm/mask"][layer]["2"]["fve"] = 0.95
    assert not findings(flipped, TINY)["mask_vs_unmask"]["reproduced"]
    # a failed SAE is out of the pairs and of the seed means
    failing = json.loads(json.dumps(fake))
    failing["runs"]["dlm/mask"]["0"]["4"]["failed"] = "90% of latents dead (> 50%)"
    failing["seed_runs"]["dlm/unmask"]["3"]["1"]["failed"] = "90% of latents dead (> 50%)"
    f2 = findings(failing, TINY)
    assert f2["mask_vs_unmask"]["pairs"] == 3 and f2["mask_vs_unmask"]["pairs_all"] == 4
    assert f2["seeds"]["fve"]["dlm/unmask"]["3"]["n"] == 2
    assert f2["seeds"]["gaps"]["mask_minus_unmask"]["per_seed"][1]["layers_used"] == 1
    assert ["dlm/mask", "0", "4", "90% of latents dead (> 50%)"] in f2["failed"]
    assert f["negative_delta"]["reproduced"] and f["negative_delta"]["dlm_layers"] == [0]
    assert f["negative_delta"]["early_layers"] == [0]  # the first quarter of a 4-block model
    # a negative Δ within 2 standard errors of zero is noise, not a finding
    noisy = json.loads(json.dumps(fake))
    for key in ("dlm/mask", "dlm/unmask"):
        for k in ("4", "8"):
            noisy["runs"][key]["0"][k]["delta"]["mask_delta_se"] = 0.08
    assert not findings(noisy, TINY)["negative_delta"]["reproduced"]
    assert f["ar_contrast"]["reproduced"] and f["ar_contrast"]["pair"] == "dlm/mask vs ar/clean"
    # each twin's contrast is computed from its own SAEs
    assert len(f["negative_delta"]["ar_matched"]) == 4 and f["negative_delta"]["ar"] == []
    assert f["ar_matched_contrast"]["ar_min_rel_delta"] < 0 < f["ar_contrast"]["ar_min_rel_delta"]
    for layer in ("0", "3"):
        for k in ("4", "8"):
            fake["runs"]["dlm/mask"][layer][k]["fve"] = 0.95
            for key in ("dlm/mask", "dlm/unmask"):
                fake["runs"][key][layer][k]["delta"]["mask_delta"] = 0.2
    f = findings(fake, TINY)
    assert not f["mask_vs_unmask"]["reproduced"] and not f["negative_delta"]["reproduced"]
    assert f["ar_contrast"]["reproduced"] is None  # nothing negative on the DLM side to contrast with
    assert f["ar_matched_contrast"]["reproduced"] is None


def test_steering_section(demo_run):
    _, results = demo_run
    st = results["steering"]
    assert st["layers"] == [3] and st["twins"] == ["ar", "ar_matched"]
    assert st["alphas"] == {"dlm": [2.0, 4.0], "ar": [1.2, 2.0, 4.0], "ar_matched": [1.2, 2.0, 4.0]}
    for key, n_alpha in (("dlm/3", 2), ("ar/3", 3), ("ar_matched/3", 3)):
        run = st["runs"][key]
        assert run["n_prompts"] == 4 and len(run["features"]) == 10        # every planted concept
        assert [r["alpha"] for r in run["summary"]["rows"]] == st["alphas"][key.split("/")[0]]
        for entry in run["features"].values():
            assert len(entry["sweep"]) == n_alpha and entry["sweep"][0]["concept_delta"]["n"] == 4
            assert "concepts_after" not in entry["sweep"][0]             # per-prompt lists are not stored
    # the steered latent is the one the concept scores chose
    chosen = results["runs"]["dlm/unmask"]["3"]["8"]["concepts_clean"]["concepts"]["food"]["latent"]
    assert f"food/{chosen}" in st["runs"]["dlm/3"]["features"]
    cell = st["dlm_minus_ar"]["3"]
    assert set(cell) == {"2", "4", "paper"} and cell["paper"]["low"] <= cell["paper"]["mean"] <= cell["paper"]["high"]
    # the controlled effect's interval is over concepts × prompts; the composite and the paper's score beside it
    assert cell["paper"]["over"] == {"concepts": 10, "prompts": 4} and cell["paper"]["verdict"] in ("DLM", "AR",
                                                                                                 "no difference")
    assert {"composite", "composite_verdict", "score_paper", "norm_ratio"} <= set(cell["paper"])
    # the same pre-specified comparison against the budget-matched twin, named as its own pair
    matched = st["dlm_minus_ar_matched"]["3"]
    assert set(matched) == {"2", "4", "paper"} and matched["paper"]["over"] == {"concepts": 10, "prompts": 4}
    assert results["findings"]["steering_matched"]["pair"] == "dlm vs ar_matched"
    assert st["runs"]["dlm/3"]["fluency"]["independent"] is False
    assert "no third causal LM" in st["runs"]["dlm/3"]["fluency"]["why"]
    # the results name the judge, never a path of the machine they ran on
    assert st["runs"]["dlm/3"]["fluency"]["model"] == "the embedded world's models/ar"
    assert os.path.dirname(os.path.abspath(dlmscope.__file__)) not in json.dumps(results)
    # the finding follows the pre-specified verdicts, and needs the paper's score to agree
    fake = json.loads(json.dumps(results))
    for c, v in zip(("paper", "2", "4"), ("DLM", "no difference", "DLM")):
        fake["steering"]["dlm_minus_ar"]["3"][c] |= {"verdict": v}
    fake["steering"]["dlm_minus_ar"]["3"]["paper"]["score_paper"]["difference"] = 0.2
    f = findings(fake, TINY)["steering"]
    assert f["reproduced"] is True and f["dlm_wins_matched"] == {"2": [], "4": ["3"]}
    assert f["ar_wins_matched"] == {"2": [], "4": []} and f["unit"] == "concepts × prompts"
    fake["steering"]["dlm_minus_ar"]["3"]["paper"]["score_paper"]["difference"] = -0.2
    f = findings(fake, TINY)["steering"]
    assert f["reproduced"] is False and f["dlm_wins_paper_alpha"] == ["3"]    # the paper's metric disagrees
    fake["steering"]["dlm_minus_ar"]["3"]["paper"] |= {"verdict": "AR"}
    f = findings(fake, TINY)["steering"]
    assert f["reproduced"] is False and f["ar_wins_paper_alpha"] == ["3"]
    del fake["steering"]
    assert findings(fake, TINY)["steering"] is None


def test_order_and_transfer_sections(demo_run):
    _, results = demo_run
    orders = results["orders"]
    assert orders["n_tasks"] == 12 and orders["spec"]["guide_layer"] == 3      # 4 per order-sensitive kind
    assert set(orders["accuracy"]) == set(ORDERS) and "correlations_within_group" in orders
    tr = results["transfer"]
    assert list(tr["summary"]) == ["3"] and tr["config"]["control"] and tr["config"]["own_text"]
    sm = tr["summary"]["3"]
    assert -1 <= sm["fve_ratio"] <= 2 and "ceiling_fve_ratio" in sm and "own_fve_ratio" in sm
    assert "init_hungarian_mean" not in sm          # each SAE from its own init seed
    cc = results["crosscoder"]
    assert list(cc["layers"]) == ["3"] and cc["config"]["placebo"] and cc["config"]["policy"] == "mask"
    entry = cc["layers"]["3"]
    assert len(entry["runs"]) == 2 and len(entry["placebo"]["runs"]) == 2
    assert set(entry["verdict"]) == {"created", "removed"} and set(entry["verdict"]["created"]["checks"]) == {
        "replicates", "above_placebo", "own_text_specific"}
    f = findings(results, TINY)
    assert f["orders"]["statistic"] == "pre_stability/3" and f["transfer"]["layers"] == ["3"]
    assert set(f["orders"]["sae_vs_base"]) <= {"sae_stable/half", "sae_stable/all", "sae_stable_entropy/half",
                                               "sae_stable_entropy/all"}
    fake = json.loads(json.dumps(results))
    fake["transfer"]["summary"]["3"] |= {"verdict": "consistent", "own_verdict": "consistent"}
    assert findings(fake, TINY)["transfer"]["reproduced"] == "consistent"       # never "reproduced"
    fake["transfer"]["summary"]["3"] |= {"own_verdict": "below_ceiling"}
    assert findings(fake, TINY)["transfer"]["reproduced"] == "partly consistent"
    fake["transfer"]["summary"]["3"] |= {"verdict": "at_null", "own_verdict": "at_null", "fve_ratio": 0.99}
    assert findings(fake, TINY)["transfer"]["reproduced"] is False               # no fixed threshold decides
    # the order finding reads the job's sign-agnostic verdict: a robust negative r counts as a robust positive
    within = fake["orders"]["correlations_within_group"]

    def corr(mean, low, high):
        return {"mean": mean, "low": low, "high": high, "n": 12, "sign": "positive" if mean > 0 else "negative",
                "verdict": "association" if low > 0 or high < 0 else "none", "denominator": "over 12 tasks of 12"}

    for order in within:
        within[order]["pre_stability/3"] = corr(-0.3, -0.5, -0.1)
    fake["orders"]["conjecture"] = {"statistic": "pre_stability/3"} | conjecture_verdict(
        {o: c["pre_stability/3"] for o, c in within.items()})
    f = findings(fake, TINY)["orders"]
    assert f["reproduced"] == "consistent" and f["sign"] == "negative" and len(f["negative"]) == len(within)
    for i, order in enumerate(within):
        within[order]["pre_stability/3"] = corr(0.3, 0.1, 0.5) if i == 0 else corr(0.05, -0.2, 0.3)
    fake["orders"]["conjecture"] = {"statistic": "pre_stability/3"} | conjecture_verdict(
        {o: c["pre_stability/3"] for o, c in within.items()})
    f = findings(fake, TINY)["orders"]
    assert f["reproduced"] == "partly consistent" and f["positive"] == [next(iter(within))]


def test_config_validation():
    with pytest.raises(ValueError, match="order_layers"):
        dataclasses.replace(TINY, order_layers=(2,))
    with pytest.raises(ValueError, match="steer_layers"):
        dataclasses.replace(TINY, steer_layers=(1,))
    with pytest.raises(ValueError, match="k_ref"):
        dataclasses.replace(TINY, k_ref=16)
    with pytest.raises(ValueError, match="n_latents"):
        dataclasses.replace(TINY, ks=(4, 8, 256), k_ref=8)
    with pytest.raises(ValueError, match="at least one layer"):
        dataclasses.replace(TINY, layers=())
    with pytest.raises(ValueError, match="concept_batches"):
        dataclasses.replace(TINY, concept_batches=1)
    assert dataclasses.replace(TINY, layers=(3, 0, 3)).layers == (0, 3)


def test_cli_demo_reports_bad_layers(tmp_path, capsys):
    n = load_world_model("dlm").num_layers
    rc = cli.main(["demo", "--out", str(tmp_path / "d"), "--layers", "0", str(n), "--k", "4", "--tokens", "2000"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "layer" in err and f"0..{n - 1}" in err


def test_21_12_demo_out_an_existing_file_is_one_line(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    rc = cli.main(["demo", "--quick", "--out", str(existing / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "is a file" in err and "Traceback" not in err
    assert existing.read_text() == "mine"


def test_21_11_results_json_is_strict_json_and_the_report_reads_it_back(demo_run, tmp_path):
    out, results = demo_run
    text = (out / "results.json").read_text()

    def refuse(name):
        raise ValueError(f"results.json holds {name}, which is not JSON")

    back = json.loads(text, parse_constant=refuse)
    with_nan = json.loads(json.dumps(results, sort_keys=True))  # NaN kept; lists for tuples, keys sorted: the file
    assert back == atomic.nan_to_null(with_nan)
    (tmp_path / "read_back").mkdir()
    (tmp_path / "with_nan").mkdir()
    report = write_report(back, TINY, tmp_path / "read_back", plots=False).read_text()
    assert report == write_report(with_nan, TINY, tmp_path / "with_nan", plots=False).read_text()


def test_seed_spread_and_gaps_by_hand():
    assert spread([0.1, None, 0.3, float("nan")]) | {"values": None} == {
        "mean": pytest.approx(0.2), "low": 0.1, "high": 0.3, "n": 2, "values": None, "interval": "min–max over seeds"}
    assert spread([None])["n"] == 0

    def entry(fve, failed=None):
        return {"fve": fve, "failed": failed}

    results = {"config": {"seed": 0}, "sae_seeds": {"k_sweep_seed": 0},
               "runs": {key: {"1": {"8": entry(f)}} for key, f in (("dlm/mask", 0.6), ("dlm/unmask", 0.9),
                                                                    ("ar/clean", 0.95))},
               "seed_runs": {"dlm/mask": {"1": {"1": entry(0.7), "2": entry(0.1, "dead")}},
                             "dlm/unmask": {"1": {"1": entry(0.8), "2": entry(0.9)}},
                             "ar/clean": {"1": {"1": entry(0.9), "2": entry(0.9)}}}}
    sm = seed_summary(results, [1], 8)
    assert sm["fve"]["dlm/mask"]["1"] | {"values": None} == {"mean": pytest.approx(0.65), "low": 0.6, "high": 0.7,
                                                             "n": 2, "values": None,
                                                             "interval": "min–max over seeds"}
    gap = sm["gaps"]["mask_minus_unmask"]
    assert [p["mean_gap"] for p in gap["per_seed"]] == [pytest.approx(-0.3), pytest.approx(-0.1), None]
    assert gap["mean_over_layers"]["mean"] == pytest.approx(-0.2) and sm["failed"] == [["dlm/mask", 1, 8, 2, "dead"]]
