"""`dlmscope eval`: its arguments are checked before any work, and its JSON (printed and --out) is strict JSON."""
from __future__ import annotations

import json
import math

import pytest

from dlmscope import cli, models
from dlmscope.jobs import eval as eval_job
from dlmscope.sae.topk import TopKSAE
from tests.helpers.tiny_models import build_tiny_llada


def strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_21_12_eval_out_a_folder_is_refused_before_the_work(tmp_path, capsys):
    """The model does not exist: the --out check must come first (it used to fail after all the work)."""
    rc = cli.main(["eval", "--model", str(tmp_path / "no-model"), "--sae", str(tmp_path / "no-sae"), "--layer", "0",
                   "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "is a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--tokens", "--loss-batches"])
def test_21_12_eval_sizes_below_one_are_refused_by_the_parser(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", "m", "--sae", "s", "--layer", "0", flag, "0"])
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_21_11_eval_json_holds_null_for_nan(tmp_path, monkeypatch, capsys):
    model = build_tiny_llada(tmp_path / "m")
    TopKSAE(models.load(model).d_model, 32, 4).save(tmp_path / "sae")
    real = eval_job.evaluate_sae
    monkeypatch.setattr(eval_job, "evaluate_sae", lambda *a, **kw: {**real(*a, **kw), "fve": math.nan})
    rc = cli.main(["eval", "--model", str(model), "--sentences", "200", "--seq-len", "16", "--lm-batch", "8",
                   "--batch-size", "64", "--sae", str(tmp_path / "sae"), "--layer", "0", "--tokens", "128",
                   "--loss-batches", "1", "--out", str(tmp_path / "eval.json")])
    assert rc == 0
    printed = strict(capsys.readouterr().out)
    written = strict((tmp_path / "eval.json").read_text())
    assert printed["fve"] is None and written == printed and written["l0"] > 0


@pytest.mark.parametrize("sampling", ["stratified", "iid"])
def test_22_5_eval_reports_the_pooled_delta_lm_with_the_per_batch_beside(tmp_path, capsys, sampling):
    model = build_tiny_llada(tmp_path / "m")
    TopKSAE(models.load(model).d_model, 32, 4).save(tmp_path / "sae")
    rc = cli.main(["eval", "--model", str(model), "--sentences", "200", "--seq-len", "16", "--lm-batch", "8",
                   "--batch-size", "64", "--sae", str(tmp_path / "sae"), "--layer", "0", "--tokens", "128",
                   "--loss-batches", "3", "--t-sampling", sampling])
    assert rc == 0
    d = strict(capsys.readouterr().out)["dlm_delta"]
    se_over = "batches, collapsed strata" if sampling == "stratified" else "batches"
    assert d["estimator"] == "pooled" and d["se_over"] == se_over and d["t_sampling"] == sampling
    assert d["n_batches"] == 3 and d["mask_delta_se"] > 0 and d["per_batch"]["mask_delta_se"] > 0
    assert d["mask_delta"] == pytest.approx(d["mask_sae"] - d["mask_clean"], abs=1e-5)
    assert d["per_batch"]["n_masked"] == d["n_masked"] > 0


def test_22_5_eval_rel_se_reports_whether_the_target_was_met(tmp_path, capsys):
    model = build_tiny_llada(tmp_path / "m")
    TopKSAE(models.load(model).d_model, 32, 4).save(tmp_path / "sae")
    args = ["eval", "--model", str(model), "--sentences", "2000", "--seq-len", "16", "--lm-batch", "8",
            "--batch-size", "64", "--sae", str(tmp_path / "sae"), "--layer", "0", "--tokens", "128",
            "--loss-batches", "8"]
    assert cli.main(args + ["--rel-se", "1e-9"]) == 0
    d = strict(capsys.readouterr().out)["dlm_delta"]
    # an unreachable target uses every batch, in rounds of 2, and says it was not met
    assert d["n_batches"] == 8 and d["se_target"] == 1e-9 and d["se_target_met"] is False
    assert d["rel_se"] == max(d["mask_delta_se"] / abs(d["mask_delta"]), d["unmask_delta_se"] / abs(d["unmask_delta"]))
    assert cli.main(args + ["--rel-se", "1e9"]) == 0
    d = strict(capsys.readouterr().out)["dlm_delta"]
    assert d["n_batches"] == 2 and d["se_target_met"] is True
    with pytest.raises(SystemExit):
        cli.main(args + ["--rel-se", "0"])
