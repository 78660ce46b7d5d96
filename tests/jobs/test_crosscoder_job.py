"""The crosscoder diff job (dlmscope.jobs.crosscoder): the whole pipeline on planted pairs with a known answer,
its refusals, one small run on the embedded world's models, and ``dlmscope transfer --crosscoder``."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dlmscope.jobs.crosscoder import crosscoder_lines, diff_layer, run_crosscoder_diff
from dlmscope.jobs.plots import plot_crosscoder
from dlmscope.jobs.transfer import world_qa_batches
from dlmscope.sae.crosscoder import Crosscoder
from tests.helpers.planted_pairs import N_EX0, N_EX1, planted_pairs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLANTED = dict(n_latents=64, k=4, rule="topk", epochs=4, seeds=2, batch_size=256, lr=3e-3, warmup_steps=0, dead_tokens=256 * 20,
               resamples=300)


def _planted_data(seed: int = 0):
    """Paired planted activations: (train [25600, 2, 32], held [4096, 2, 32], own [4096, 2, 32] where the features
    exclusive to source 1 fire 3× as often), and the same for a placebo pair whose two sources share every
    feature (source 1 = source 0 + small noise)."""
    _, _, sample = planted_pairs(seed)
    gen = torch.Generator().manual_seed(seed + 5)
    target = (sample(25_600, gen), sample(4096, gen), sample(4096, gen, boost=3.0))

    def placebo_of(x):
        return torch.stack([x[:, 0], x[:, 0] + 0.01 * torch.randn(x[:, 0].shape, generator=gen)], 1)

    return target, tuple(placebo_of(x) for x in target)


@pytest.fixture(scope="module")
def planted_diff():
    target, placebo = _planted_data()
    return diff_layer(*target, placebo=placebo, **PLANTED)


def test_diff_layer_finds_the_planted_exclusive_features(planted_diff):
    out = planted_diff
    assert set(out) == {"scales", "runs", "replication", "verdict", "lean", "placebo"}
    assert json.loads(json.dumps(out)) is not None
    for run in out["runs"]:
        assert all(f > 0.8 for f in run["fve"]["text"] + run["fve"]["own"]), run["fve"]
        # every planted exclusive feature is found, robust (Latent Scaling does not flag it), on its side
        assert run["sides"]["created"]["robust"] == N_EX1 and run["sides"]["removed"]["robust"] == N_EX0, run
    for run in out["placebo"]["runs"]:  # sources that share every feature: nothing exclusive
        assert run["sides"]["created"]["robust"] == 0 and run["sides"]["removed"]["robust"] == 0
    created, removed = out["verdict"]["created"], out["verdict"]["removed"]
    # created: replicated, above the placebo, and firing more on the text where those features are common
    assert created["checks"] == {"replicates": True, "above_placebo": True, "own_text_specific": True}
    assert created["outcome"] == "shown" and created["words"].startswith("shown")
    # removed: the same, but the own text does not favour source-0 features, so that check fails
    assert removed["checks"]["replicates"] and removed["checks"]["above_placebo"]
    assert not removed["checks"]["own_text_specific"] and removed["outcome"] == "not_shown"
    assert "own_text_specific failed" in removed["words"]
    spec = [r["sides"]["created"]["specificity"]["minus_shared"] for r in out["runs"]]
    assert all(iv["low"] > 0.5 for iv in spec), spec                # log(3) ≈ 1.1 more often on own text
    assert out["lean"]["target"] == "target_lean_fires_on_own_text" and out["lean"]["placebo"] == "none"
    reps = out["replication"]["created"]
    assert len(reps) == 2 and all(r["p_value"] < 0.05 and r["replicated"] == N_EX1 for r in reps)


def test_diff_layer_without_placebo_or_own_text():
    (train, held, _), _ = _planted_data(seed=1)
    out = diff_layer(train, held, None, **{**PLANTED, "epochs": 1})
    assert "placebo" not in out and out["lean"] == {"target": None, "placebo": None}
    for v in out["verdict"].values():
        assert set(v["checks"]) == {"replicates"} and v["placebo_counts"] is None
        assert "no placebo null" in v["words"]


def test_diff_layer_refuses_bad_input():
    x = torch.randn(512, 2, 8)
    kw = dict(n_latents=16, k=2, batch_size=256)
    with pytest.raises(ValueError, match="seeds must be >= 2"):
        diff_layer(x, x, None, seeds=1, **kw)
    with pytest.raises(ValueError, match=r"held_x must be \[N, 2, d\].*d=8"):
        diff_layer(x, torch.randn(10, 2, 7), None, **kw)
    with pytest.raises(ValueError, match="fewer than one batch"):
        diff_layer(x[:100], x, None, **kw)
    with pytest.raises(ValueError, match="own_x given exactly when"):
        diff_layer(x, x, x, placebo=(x, x, None), **kw)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        diff_layer(x, x, None, epochs=0, **kw)


# --------------------------------------------------------------------------------------- the world models
def test_run_crosscoder_diff_on_the_world_models(world, tmp_path):
    base, inst, _, batches = world
    tok = base.tokenizer
    own = (world_qa_batches(tok, samples=200, seq_len=64, lm_batch=8, seed=1),
           world_qa_batches(tok, samples=100, seq_len=64, lm_batch=8, seed=0))
    with pytest.raises(ValueError, match="layer 99 out of range"):
        run_crosscoder_diff(base, inst, [99], batches=batches)
    with pytest.raises(ValueError, match="seeds must be >= 2"):
        run_crosscoder_diff(base, inst, [2], seeds=1, batches=batches)
    result = run_crosscoder_diff(base, inst, [2], placebo=base, n_latents=64, k=4, train_tokens=2_048,
                                 eval_tokens=600, epochs=1, seeds=2, batches=batches, own_batches=own,
                                 batch_size=256, resamples=100, save_dir=tmp_path / "cc")
    assert json.loads(json.dumps(result)) is not None and result["config"]["placebo"]
    entry = result["layers"]["2"]
    assert len(entry["runs"]) == 2 and len(entry["placebo"]["runs"]) == 2
    for run in entry["runs"]:
        assert run["held_tokens"] == 1_200 and len(run["fve"]["text"]) == 2 and len(run["fve"]["own"]) == 2
    # the placebo is the base itself: identical sources, nothing exclusive
    assert all(r["sides"][s]["robust"] == 0 for r in entry["placebo"]["runs"] for s in ("created", "removed"))
    for r in range(2):
        cc = Crosscoder.load(tmp_path / "cc" / "layer_2" / f"seed_{r}")
        assert (cc.S, cc.d, cc.n, cc.k) == (2, 128, 64, 4) and cc.meta["layer"] == 2 and cc.meta["policy"] == "unmask"
    lines = crosscoder_lines(result)
    assert lines[0].startswith("layer 2: crosscoder FVE") and any("created:" in x for x in lines)
    assert plot_crosscoder(result, tmp_path / "cc.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_transfer_crosscoder(tmp_path, capsys):
    from dlmscope import cli
    from dlmscope.world import ASSETS_DIR

    m = lambda name: os.path.join(ASSETS_DIR, "models", name)  # noqa: E731
    common = ["transfer", "--base", m("dlm"), "--target", m("instruct"), "--layers", "2", "--n", "64", "--k", "4",
              "--sentences", "3000", "--out", str(tmp_path / "t")]
    rc = cli.main(common + ["--crosscoder", "--tokens", "2048", "--eval-tokens", "500", "--seeds", "2",
                            "--own-corpus", "world-qa"])
    assert rc == 0
    out = tmp_path / "t"
    result = json.loads((out / "crosscoder.json").read_text())
    assert list(result["layers"]) == ["2"] and result["config"]["own_text"] and not result["config"]["placebo"]
    assert (out / "crosscoder.png").read_bytes()[:8] == PNG_MAGIC
    assert Crosscoder.load(out / "crosscoders" / "layer_2" / "seed_1").k == 4
    assert "layer 2: crosscoder FVE" in capsys.readouterr().out
    for extra, msg in ((["--crosscoder", "--seeds", "1"], "seeds >= 2"), (["--placebo", m("dlm")], "--crosscoder"),
                       (["--crosscoder", "--control", m("ar")], "--control")):
        assert cli.main(common + extra) == 2  # refused before any model is loaded
        assert msg in capsys.readouterr().err
