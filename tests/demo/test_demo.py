"""`make demo` end to end on a miniature setting: results, plots, report, findings; and the CLI entry."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from dlmscope import cli
from dlmscope.demo import RUNS, DemoConfig, findings, load_world_model, run_demo
from dlmscope.demo.report import write_report
from dlmscope.jobs.order import ORDERS
from dlmscope.util import atomic

TINY = DemoConfig(layers=(0, 3), ks=(4, 8), k_ref=8, n_latents=128, train_tokens=6_000, eval_tokens=2_000,
                  delta_batches=2, concept_batches=2, sentences=6_000, sae_batch=512, warmup_steps=2,
                  norm_batches=2, dead_tokens=4_000, steer_layers=(3,), steer_prompts=4, steer_gen=4,
                  order_layers=(0, 3), order_tasks=4, order_seeds=(0,), transfer_layers=(3,), transfer_tokens=6_000,
                  transfer_eval_tokens=2_000, transfer_delta_batches=1)
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
    base = results["concept_baselines"]
    assert set(base) == {f"{m}/{p}" for m, p in RUNS} and set(base["dlm/mask"]["0"]) == {"concepts_clean",
                                                                                          "concepts_masked"}
    assert set(base["ar/clean"]["0"]) == {"concepts_clean"}
    assert all(0.0 <= v <= 1.0 for run in base.values() for layer in run.values() for v in layer.values())
    # the SAEs are saved and load back
    from dlmscope.sae.topk import TopKSAE

    sae = TopKSAE.load(out / "saes" / "dlm_mask" / "layer_3" / "k_8")
    assert (sae.d, sae.n, sae.k) == (128, 128, 8) and sae.cfg.meta["policy"] == "mask"


def test_plots_and_report(demo_run):
    out, results = demo_run
    for name in ("fve_vs_k.png", "delta_lm.png", "concept_f1.png", "steering.png", "order_accuracy.png",
                 "order_dynamics.png", "order_progress.png", "transfer.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    report = (out / "report.md").read_text()
    for heading in ("## Reconstruction", "## Splice-in", "## Planted concepts", "## Steering during generation",
                    "## Decoding orders", "## Base → instruct transfer", "## The paper's findings"):
        assert heading in report
    for name in ("fve_vs_k.png", "delta_lm.png", "concept_f1.png", "steering.png", "order_accuracy.png",
                 "transfer.png"):
        assert f"]({name})" in report
    # every FVE in the table is the one in results.json
    fve = results["runs"]["dlm/unmask"]["3"]["8"]["fve"]
    assert f"{fve:.3f}" in report
    f = results["findings"]
    verdicts = ("**reproduced**", "**not reproduced**", "**not testable here**", "**partly reproduced**")
    assert sum(report.count(v) for v in verdicts) == 6
    assert isinstance(f["mask_vs_unmask"]["reproduced"], bool)
    assert f["mask_vs_unmask"]["pairs"] == 4 and 0 <= f["mask_vs_unmask"]["mask_worse"] <= 4
    assert not (out / "cache").exists()  # the scratch activation cache is removed


def test_findings_follow_the_numbers(demo_run):
    _, results = demo_run
    fake = json.loads(json.dumps(results))
    for layer in ("0", "3"):
        for k in ("4", "8"):
            fake["runs"]["dlm/mask"][layer][k]["fve"] = 0.5
            fake["runs"]["dlm/unmask"][layer][k]["fve"] = 0.9
            for key in ("dlm/mask", "dlm/unmask"):
                fake["runs"][key][layer][k]["delta"]["mask_delta"] = -0.1 if layer == "0" else 0.2
                fake["runs"][key][layer][k]["delta"]["mask_delta_se"] = 0.01
            fake["runs"]["ar/clean"][layer][k]["delta"]["delta"] = 0.3
    f = findings(fake, TINY)
    assert f["mask_vs_unmask"]["reproduced"] and f["mask_vs_unmask"]["mean_gap"] == pytest.approx(-0.4)
    assert f["negative_delta"]["reproduced"] and f["negative_delta"]["dlm_layers"] == [0]
    assert f["negative_delta"]["early_layers"] == [0]  # the first quarter of a 4-block model
    # a negative Δ within 2 standard errors of zero is noise, not a finding
    noisy = json.loads(json.dumps(fake))
    for key in ("dlm/mask", "dlm/unmask"):
        for k in ("4", "8"):
            noisy["runs"][key]["0"][k]["delta"]["mask_delta_se"] = 0.08
    assert not findings(noisy, TINY)["negative_delta"]["reproduced"]
    assert f["ar_contrast"]["reproduced"]
    for layer in ("0", "3"):
        for k in ("4", "8"):
            fake["runs"]["dlm/mask"][layer][k]["fve"] = 0.95
            for key in ("dlm/mask", "dlm/unmask"):
                fake["runs"][key][layer][k]["delta"]["mask_delta"] = 0.2
    f = findings(fake, TINY)
    assert not f["mask_vs_unmask"]["reproduced"] and not f["negative_delta"]["reproduced"]
    assert f["ar_contrast"]["reproduced"] is None  # nothing negative on the DLM side to contrast with


def test_steering_section(demo_run):
    _, results = demo_run
    st = results["steering"]
    assert st["layers"] == [3] and st["alphas"] == {"dlm": [2.0, 4.0], "ar": [1.2, 2.0, 4.0]}
    for key, n_alpha in (("dlm/3", 2), ("ar/3", 3)):
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
    # the finding follows the intervals
    fake = json.loads(json.dumps(results))
    for c, (lo, hi) in zip(("paper", "2", "4"), ((0.1, 0.3), (-0.1, 0.2), (0.05, 0.1))):
        fake["steering"]["dlm_minus_ar"]["3"][c] |= {"low": lo, "high": hi}
    f = findings(fake, TINY)["steering"]
    assert f["reproduced"] is True and f["dlm_wins_matched"] == {"2": [], "4": ["3"]}
    assert f["ar_wins_matched"] == {"2": [], "4": []}
    fake["steering"]["dlm_minus_ar"]["3"]["paper"] |= {"low": -0.3, "high": -0.1}
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
    assert list(tr["summary"]) == ["3"] and tr["config"]["control"]
    assert -1 <= tr["summary"]["3"]["fve_ratio"] <= 2
    f = findings(results, TINY)
    assert f["orders"]["statistic"] == "pre_stability/3" and f["transfer"]["layers"] == ["3"]
    fake = json.loads(json.dumps(results))
    fake["transfer"]["summary"]["3"] |= {"fve_ratio": 0.95, "corr_median": 0.9}
    assert findings(fake, TINY)["transfer"]["reproduced"] is True
    fake["transfer"]["summary"]["3"] |= {"fve_ratio": 0.5}
    assert findings(fake, TINY)["transfer"]["reproduced"] is False
    # the order finding counts orders whose within-group correlation is beyond its interval, by sign
    within = fake["orders"]["correlations_within_group"]
    for i, order in enumerate(within):
        within[order]["pre_stability/3"] = {"mean": 0.3, "low": 0.1, "high": 0.5, "n": 12}
    assert findings(fake, TINY)["orders"]["reproduced"] is True
    for i, order in enumerate(within):
        if i:  # one positive order, the rest negative
            within[order]["pre_stability/3"] = {"mean": -0.3, "low": -0.5, "high": -0.1, "n": 12}
    f = findings(fake, TINY)["orders"]
    assert f["reproduced"] is False and len(f["positive"]) == 1 and len(f["negative"]) == len(within) - 1


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
