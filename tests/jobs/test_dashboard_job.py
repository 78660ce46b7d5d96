"""dlmscope.jobs.dashboard and ``dlmscope dashboard``: report + planted concepts + auto-interp + the site."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dlmscope import cli
from dlmscope.demo import load_world_model
from dlmscope.jobs.dashboard import build_report
from dlmscope.sae.topk import TopKSAE
from dlmscope.world import ASSETS_DIR, CONCEPTS, world_batches
from tests.helpers.chat_server import ChatHandler, StatusHandler, serving


def test_build_report_adds_concepts_and_interp():
    dlm = load_world_model("dlm")
    torch.manual_seed(0)
    sae = TopKSAE(dlm.d_model, 48, 4)
    _, held = world_batches(dlm.tokenizer, 4000, 64, 16, 0)
    r = build_report(dlm, sae, 3, held[:2], sample=4, masked_t=0.3)
    assert len(r["latents"]) == 4 and r["interp_summary"]["n"] == 4
    for e in r["latents"].values():
        assert e["concept"]["name"] in CONCEPTS and 0 <= e["concept"]["f1"] <= 1
        assert e["interp"]["explanation"] in set(CONCEPTS) | {"none"} and 0 <= e["interp"]["accuracy"] <= 1
    plain = build_report(dlm, sae, 3, held[:2], sample=2, explainer=False, planted=False)
    assert "interp" not in next(iter(plain["latents"].values())) and "interp_summary" not in plain
    with pytest.raises(ValueError, match="needs an explainer"):
        build_report(dlm, sae, 3, held[:1], sample=2, planted=False)


def test_cli_dashboard_writes_the_report_the_site_and_a_neuronpedia_export(tmp_path, capsys):
    dlm = load_world_model("dlm")
    torch.manual_seed(0)
    TopKSAE(dlm.d_model, 48, 4).save(tmp_path / "sae")
    model = os.path.join(ASSETS_DIR, "models", "dlm")
    rc = cli.main(["dashboard", "--model", model, "--sae", str(tmp_path / "sae"), "--layer", "2",
                   "--sentences", "4000", "--lm-batch", "16", "--batches", "2", "--sample", "3",
                   "--neuronpedia", str(tmp_path / "np"), "--out", str(tmp_path / "dash")])
    assert rc == 0
    report = json.loads((tmp_path / "dash" / "report.json").read_text())
    assert len(report["latents"]) == 3 and (tmp_path / "dash" / "index.html").exists()
    for key in report["latents"]:
        assert (tmp_path / "dash" / "latents" / f"{key}.html").exists()
    assert list((tmp_path / "np").glob("batch-*.json"))
    assert "auto-interp over 3 latents" in capsys.readouterr().out
    assert cli.main(["dashboard", "--model", model, "--sae", str(tmp_path / "sae"), "--layer", "2",
                     "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d2")]) == 2


class _AnyHandler(ChatHandler):
    """One reply that both the explainer and the judge accept."""

    def content(self, body):
        return json.dumps({"explanation": "animals", "score": 50})


def test_cli_dashboard_openai_judge_into_an_out_not_made_yet(tmp_path, monkeypatch):
    """Issue 21.3: the judge's cache lives in ``--out``; a folder that does not exist yet must not lose the run."""
    dlm = load_world_model("dlm")
    torch.manual_seed(0)
    TopKSAE(dlm.d_model, 48, 4).save(tmp_path / "sae")
    with serving(_AnyHandler) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{srv.server_address[1]}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "k")
        out = tmp_path / "new" / "dash"
        rc = cli.main(["dashboard", "--model", os.path.join(ASSETS_DIR, "models", "dlm"), "--sae",
                       str(tmp_path / "sae"), "--layer", "2", "--sentences", "4000", "--lm-batch", "16",
                       "--batches", "2", "--sample", "2", "--judge", "openai", "--out", str(out)])
    assert rc == 0 and srv.seen
    assert (out / "report.json").is_file() and (out / "judge_cache.json").is_file()


def test_cli_dashboard_rejected_key_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """Issue 21.7: a refused key stops the run with the CLI's one-line error, not an empty auto-interp."""
    dlm = load_world_model("dlm")
    torch.manual_seed(0)
    TopKSAE(dlm.d_model, 48, 4).save(tmp_path / "sae")
    with serving(StatusHandler) as srv:
        srv.status = 401
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{srv.server_address[1]}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "wrong")
        rc = cli.main(["dashboard", "--model", os.path.join(ASSETS_DIR, "models", "dlm"), "--sae",
                       str(tmp_path / "sae"), "--layer", "2", "--sentences", "4000", "--lm-batch", "16",
                       "--batches", "2", "--sample", "2", "--judge", "openai", "--out", str(tmp_path / "dash")])
    err = capsys.readouterr().err
    assert rc == 2 and "dlmscope dashboard: error" in err and "HTTP 401" in err and "wrong" not in err
    assert len(srv.seen) == 1 and not (tmp_path / "dash" / "report.json").exists()
