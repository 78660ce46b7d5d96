"""dlmscope.jobs.dashboard and ``dlmscope dashboard``: report + planted concepts + auto-interp + the site."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from dlmscope import cli
from dlmscope.demo import load_world_model
from dlmscope.jobs import dashboard
from dlmscope.jobs.dashboard import build_report
from dlmscope.sae.topk import TopKSAE
from dlmscope.world import ASSETS_DIR, CONCEPTS, world_batches
from tests.helpers.chat_server import ChatHandler, ScriptHandler, StatusHandler, serving


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


MODEL = os.path.join(ASSETS_DIR, "models", "dlm")


def _sae(tmp_path) -> str:
    dlm = load_world_model("dlm")
    torch.manual_seed(0)
    TopKSAE(dlm.d_model, 48, 4).save(tmp_path / "sae")
    return str(tmp_path / "sae")


def _dashboard(sae: str, out, *extra: str) -> int:
    return cli.main(["dashboard", "--model", MODEL, "--sae", sae, "--layer", "2", "--sentences", "4000",
                     "--lm-batch", "16", "--batches", "1", "--sample", "2", "--out", str(out), *extra])


def _no_work(monkeypatch):
    """Make loading the model fail the test: what is checked must be refused before the work."""
    def work(args):
        raise AssertionError("the work started")
    monkeypatch.setattr(dashboard, "load_model_layer_sae", work)


def _serve_judge(monkeypatch, srv):
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{srv.server_address[1]}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "k")


class _ExplainsButJudges(ChatHandler):
    """Explains every latent ("animals"); answers each judge request with ``server.judge_status``."""

    def content(self, body):
        if "You rate texts" in body["messages"][0]["content"]:
            return self.server.judge_status
        return json.dumps({"explanation": "animals"})


def test_21_7_dashboard_reports_judge_failures_at_the_end(tmp_path, monkeypatch, capsys):
    sae = _sae(tmp_path)
    with serving(_ExplainsButJudges) as srv:
        srv.judge_status = 400
        _serve_judge(monkeypatch, srv)
        rc = _dashboard(sae, tmp_path / "dash", "--judge", "openai")
    assert rc == 0
    err = capsys.readouterr().err
    assert "judge: 30 calls, 28 failed (HTTP 400: 28)" in err
    report = json.loads((tmp_path / "dash" / "report.json").read_text())
    assert report["judge_calls"] == {"calls": 30, "failed": 28, "requests": 30, "reasons": {"HTTP 400": 28}}


def test_21_7_every_judge_call_failed_exits_non_zero_after_writing_the_report(tmp_path, monkeypatch, capsys):
    sae = _sae(tmp_path)
    with serving(ScriptHandler) as every:
        every.script = [(400, {})]
        _serve_judge(monkeypatch, every)
        rc = _dashboard(sae, tmp_path / "dash", "--judge", "openai")
    err = capsys.readouterr().err
    assert rc == 1 and len(every.seen) == 2
    assert "dlmscope dashboard: error: every one of the 2 judge calls failed (HTTP 400: 2)" in err
    report = json.loads((tmp_path / "dash" / "report.json").read_text())
    assert report["interp_summary"]["n"] == 0 and report["judge_calls"]["failed"] == 2
    assert (tmp_path / "dash" / "index.html").is_file()


def test_21_8_a_judge_failing_late_still_writes_the_report(tmp_path, monkeypatch, capsys):
    """The explanations come back, then the endpoint refuses the key: the report of what was computed is
    written, and the refusal is the CLI's one-line error."""
    sae = _sae(tmp_path)
    with serving(_ExplainsButJudges) as srv:
        srv.judge_status = 401
        _serve_judge(monkeypatch, srv)
        rc = _dashboard(sae, tmp_path / "dash", "--judge", "openai")
    err = capsys.readouterr().err
    assert rc == 2 and "dlmscope dashboard: error: judge endpoint" in err and "HTTP 401" in err
    report = json.loads((tmp_path / "dash" / "report.json").read_text())
    assert len(report["latents"]) == 2 and "HTTP 401" in report["interp_error"]
    assert report["interp_summary"]["complete"] is False
    assert (tmp_path / "dash" / "index.html").is_file()


def test_21_12_unreachable_judge_is_one_line_before_the_work(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                          # nothing listens here once closed
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    _no_work(monkeypatch)
    rc = _dashboard(str(tmp_path / "sae"), tmp_path / "dash", "--judge", "openai")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("dlmscope dashboard: error: judge endpoint") and "unreachable" in err
    assert not (tmp_path / "dash").exists()


def test_21_12_dashboard_out_that_is_a_file_is_one_line_before_the_work(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    (tmp_path / "file").write_text("keep me")
    for flags in (["--out", str(tmp_path / "file")], ["--out", str(tmp_path / "file" / "below")],
                  ["--out", str(tmp_path / "dash"), "--neuronpedia", str(tmp_path / "file")]):
        rc = cli.main(["dashboard", "--model", MODEL, "--sae", str(tmp_path / "sae"), "--layer", "2", *flags])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "is a file, not a folder" in err, flags
    assert (tmp_path / "file").read_text() == "keep me"


def test_21_17_dashboard_masked_t_outside_0_1_is_refused(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    for t in ("2", "0", "-0.3", "nan", "inf", "lots"):
        with pytest.raises(SystemExit) as info:
            _dashboard(str(tmp_path / "sae"), tmp_path / "dash", "--masked-t", t)
        err = capsys.readouterr().err
        assert info.value.code == 2 and "dlmscope dashboard: error: argument --masked-t" in err, t
    assert not (tmp_path / "dash").exists()


def test_21_17_corrupt_judge_cache_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    (tmp_path / "dash").mkdir()
    (tmp_path / "dash" / "judge_cache.json").write_text("{truncated")
    rc = _dashboard(str(tmp_path / "sae"), tmp_path / "dash", "--judge", "openai")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(tmp_path / "dash" / "judge_cache.json") in err
