"""dlmscope.jobs.order and ``dlmscope order``: orders compared on world tasks (small), structure and bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dlmscope import cli
from dlmscope.jobs.order import OrderSpec, fill_with_order, run_order
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
    # replayed statistics and correlations exist for every order at 'all' steps (multi-answer tasks only)
    assert set(r["statistics"]) == {"low_confidence", "random", "left_to_right", "entropy", "sae_stable"}
    assert set(r["statistics"]["entropy"]) == {"arith_chain/3"}
    keys = {f"{s}/{L}" for s in ("pre_stability", "lock_ratio", "post_drift") for L in (1, 3)}
    assert set(r["correlations"]["sae_stable"]) == keys == set(r["correlations_within_group"]["sae_stable"])
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
                   "--steps", "all", "--seeds", "0", "--guide-layer", "3", "--top-k", "4", "--out", str(tmp_path / "o")])
    assert rc == 0
    result = json.loads((tmp_path / "o" / "order.json").read_text())
    assert result["n_tasks"] == 6 and (tmp_path / "o" / "order_accuracy.png").exists()
    assert "sae_stable" in capsys.readouterr().out
    assert cli.main(["order", "--model", model, "--sae", "x=y", "--out", str(tmp_path / "o")]) == 2
    assert "LAYER=DIR" in capsys.readouterr().err
