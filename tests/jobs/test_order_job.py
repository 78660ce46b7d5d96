"""dlmscope.jobs.order and ``dlmscope order``: orders compared on world tasks (small), the pre-specified pairing,
matched commit schedules, per-task correctness, structure and bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dlmscope import cli
from dlmscope.jobs.order import BASE_ORDER, OrderSpec, commit_schedule, fill_with_order, run_order
from dlmscope.jobs.plots import plot_order
from dlmscope.sae.topk import TopKSAE
from dlmscope.world import ASSETS_DIR
from dlmscope.world.tasks import load_tasks


@pytest.fixture(scope="module")
def world_tasks():
    tasks, held = load_tasks(Path(ASSETS_DIR) / "tasks.jsonl")
    keep = [i for i, t in enumerate(tasks) if t.kind == "arith_chain"][:6] + \
           [i for i, t in enumerate(tasks) if t.kind == "fact"][:4]
    return [tasks[i] for i in keep], [held[i] for i in keep]


@pytest.fixture(scope="module")
def saes(dlm):
    torch.manual_seed(0)
    return {L: TopKSAE(dlm.d_model, 64, 4) for L in (1, 3)}


def test_orders_compared_on_tasks(dlm, world_tasks, saes, tmp_path):
    tasks, held = world_tasks
    spec = OrderSpec(orders=("low_confidence", "random", "left_to_right", "entropy", "sae_stable"),
                     steps=("one", "all"), seeds=(0, 1), guide_layer=3, top_k=4)
    r = run_order(dlm, saes, tasks, held, spec, progress=False)
    assert r["groups"] == {"arith_chain/3": 6, "fact/1": 4}
    for order, by_steps in r["accuracy"].items():
        for st, cell in by_steps.items():
            if order == "left_to_right" and st == "one":
                # one-token blocks need one step per answer: only the one-answer tasks ran
                assert cell["order_sensitive"] is None and cell["all"]["n"] == 4
                continue
            assert 0 <= cell["all"]["mean"] <= 1 and cell["all"]["n"] == 10
            assert cell["order_sensitive"]["n"] == 6 and set(cell["by_kind"]) == {"arith_chain", "fact"}
    # with one step every order commits everything at once: the same answers
    one = {o: r["accuracy"][o]["one"]["all"]["mean"] for o in ("low_confidence", "entropy", "sae_stable")}
    assert len(set(one.values())) == 1
    cmp = r["sae_vs_best_confidence"]["sae_stable"]["all"]
    assert cmp["best_confidence_order"] in ("low_confidence", "entropy") and cmp["difference"]["n"] == 6
    assert cmp["post_hoc"] is True
    # the pre-specified comparison: against its own base order, paired over the 6 order-sensitive tasks
    own = r["sae_vs_base"]["sae_stable"]
    assert set(own) == {"one", "all"} and own["all"]["base_order"] == "low_confidence" and own["all"]["pre_specified"]
    assert own["all"]["difference"]["over"] == {"tasks": 6} and own["all"]["denominator"] == \
        "over 6 order-sensitive tasks"
    assert own["one"]["difference"]["mean"] == 0 and own["one"]["verdict"] == "tie"   # one step: the same fill
    # per-task correctness: one list per (order, steps, seed); the paired mean is the mean of the stored pairs
    pt = r["per_task"]
    assert pt["answers"] == [3] * 6 + [1] * 4 and pt["kind"][0] == "arith_chain" and len(pt["heldout"]) == 10
    assert set(pt["correct"]["random"]["all"]) == {"0", "1"} and set(pt["correct"]["sae_stable"]["all"]) == {"0"}
    assert pt["correct"]["left_to_right"]["one"]["0"][:6] == [None] * 6
    sae, base = pt["correct"]["sae_stable"]["all"]["0"][:6], pt["correct"]["low_confidence"]["all"]["0"][:6]
    assert own["all"]["difference"]["mean"] == pytest.approx(sum(a - b for a, b in zip(sae, base)) / 6)
    assert r["accuracy"]["random"]["all"]["all"]["mean"] == pytest.approx(
        sum(sum(v) / 2 for v in zip(*pt["correct"]["random"]["all"].values())) / 10)
    # denominators named; every order commits the same counts per step (Dream's entropy at matched commits)
    assert r["accuracy"]["low_confidence"]["all"]["order_sensitive"]["denominator"] == \
        "over 6 order-sensitive (multi-answer) tasks of 10"
    assert r["accuracy"]["random"]["all"]["all"]["denominator"] == "over 10 tasks of 10, mean of 2 seeds per task"
    assert r["n_order_sensitive"] == 6 and r["spec"]["dream_schedule"] == "matched"
    assert {o: r["schedules"][o]["all"]["arith_chain/3"] for o in ("low_confidence", "entropy", "sae_stable")} == \
        {o: [1, 1, 1] for o in ("low_confidence", "entropy", "sae_stable")}
    # replayed statistics and correlations exist for every order at 'all' steps (multi-answer tasks only)
    assert set(r["statistics"]) == {"low_confidence", "random", "left_to_right", "entropy", "sae_stable"}
    assert set(r["statistics"]["entropy"]) == {"arith_chain/3"}
    keys = {f"{s}/{L}" for s in ("pre_stability", "lock_ratio", "post_drift") for L in (1, 3)}
    assert set(r["correlations"]["sae_stable"]) == keys == set(r["correlations_within_group"]["sae_stable"])
    c = r["correlations_within_group"]["sae_stable"]["pre_stability/3"]
    assert c["verdict"] in ("association", "none", "undefined") and c["sign"] in ("positive", "negative", "none")
    # one denominator: the tasks in r out of the order-sensitive tasks replayed (6 of the 10)
    assert c["denominator"].startswith(f"over {c['n']} order-sensitive tasks replayed at 'all' steps of 6")
    assert c["n"] + sum(c["excluded_groups"].values()) == 6 and c["within_groups"]
    conj = r["conjecture"]
    assert conj["statistic"] == "pre_stability/3" and conj["verdict"] in ("association", "partly", "not reproduced")
    feats = r["order_sensitive_features"]["entropy"]["arith_chain/3"]
    assert set(feats) == {"1", "3"} and len(feats["1"]) == 20 and all(0 <= f < 64 for f, _ in feats["1"])
    assert r["bytes_per_state_position_layer"] == 24
    json.dumps(r)
    paths = plot_order(r, tmp_path / "order")
    assert [p.name for p in paths] == ["order_accuracy.png", "order_dynamics.png", "order_progress.png"]
    # a stable order's run at 'all' steps: one commit per step
    canvas = [tasks[0].encode(dlm.tokenizer)[0]]
    gen = fill_with_order(dlm, canvas, "sae_stable", 3, guide_sae=saes[3], guide_layer=3, history=True)
    assert gen.committed.sum(2)[:, 0].tolist() == [1, 1, 1]
    assert not math.isnan(r["accuracy"]["random"]["all"]["all"]["mean"])


def test_commit_schedules():
    assert BASE_ORDER == {"sae_stable": "low_confidence", "sae_stable_entropy": "entropy"}
    assert commit_schedule("entropy", 3, 3) == [1, 1, 1] == commit_schedule("sae_stable", 3, 3)
    assert commit_schedule("entropy", 3, 3, "dream") == [0, 1, 2]         # Dream's floor: nothing at the first step
    assert commit_schedule("sae_stable_entropy", 5, 3, "dream") == [1, 1, 3]
    assert commit_schedule("low_confidence", 5, 3, "dream") == [2, 2, 1]  # LLaDA's orders keep LLaDA's counts
    assert commit_schedule("left_to_right", 3, 2) is None and commit_schedule("origin", 3, 3).startswith("random")
    with pytest.raises(ValueError, match="dream_schedule"):
        commit_schedule("entropy", 3, 3, "published")


def test_bad_input(dlm, world_tasks, saes):
    tasks, held = world_tasks
    with pytest.raises(ValueError, match="did you mean 'entropy'"):
        run_order(dlm, saes, tasks, held, OrderSpec(orders=("entropi",)), progress=False)
    with pytest.raises(ValueError, match="guide_layer 4 has no SAE"):
        run_order(dlm, saes, tasks, held, OrderSpec(orders=("sae_stable",), guide_layer=4), progress=False)
    with pytest.raises(ValueError, match="needs guide_sae"):
        fill_with_order(dlm, [tasks[0].encode(dlm.tokenizer)[0]], "sae_stable", 3)


def test_cli_order(dlm, saes, tmp_path, capsys):
    for L, sae in saes.items():
        sae.save(tmp_path / f"sae{L}")
    model = str(Path(ASSETS_DIR) / "models" / "dlm")
    rc = cli.main(["order", "--model", model, "--sae", f"1={tmp_path / 'sae1'}", f"3={tmp_path / 'sae3'}",
                   "--kinds", "count", "--max-tasks", "6", "--orders", "low_confidence", "sae_stable",
                   "--steps", "all", "--seeds", "0", "--guide-layer", "3", "--top-k", "4",
                   "--out", str(tmp_path / "o")])
    assert rc == 0
    result = json.loads((tmp_path / "o" / "order.json").read_text())
    assert result["n_tasks"] == 6 and (tmp_path / "o" / "order_accuracy.png").exists()
    printed = capsys.readouterr().out
    assert "sae_stable" in printed and "sae_stable − low_confidence (pre-specified): all" in printed
    assert cli.main(["order", "--model", model, "--sae", "x=y", "--out", str(tmp_path / "o")]) == 2
    assert "LAYER=DIR" in capsys.readouterr().err
    assert cli.main(["order", "--model", model, "--sae", f"1={tmp_path / 'sae1'}", "--dream-schedule", "published",
                     "--out", str(tmp_path / "o")]) == 2
    assert "--dream-schedule" in capsys.readouterr().err
