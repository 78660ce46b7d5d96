"""`dlmscope train` / `dlmscope eval` end to end on a tiny LLaDA-format model with the embedded world's tokenizer."""
from __future__ import annotations

import json

import pytest

from dlmscope import cli

from tests.helpers.tiny_models import build_tiny_llada


@pytest.fixture(scope="module")
def tiny_llada(tmp_path_factory):
    return build_tiny_llada(tmp_path_factory.mktemp("llada"))


def test_train_then_eval(tiny_llada, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--model", str(tiny_llada), "--sentences", "800", "--seq-len", "16", "--lm-batch", "16",
              "--batch-size", "128"]
    rc = cli.main(["train", *common, "--layers", "0", "1", "--k", "2", "4", "--n", "64", "--tokens", "1024",
                   "--eval-tokens", "512", "--warmup", "2", "--log-every", "0", "--checkpoint-every", "4",
                   "--norm-batches", "2", "--buffer-tokens", "512", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["layers"]) == {"0", "1"}
    for layer in ("0", "1"):
        for k in ("2", "4"):
            metrics = summary["layers"][layer][k]
            assert 0.0 < metrics["l0"] <= int(k) and -1.0 < metrics["fve"] <= 1.0
            assert (out / f"layer_{layer}" / f"k_{k}" / "sae.safetensors").is_file()
    rc = cli.main(["eval", *common, "--sae", str(out / "layer_1" / "k_4"), "--layer", "1", "--tokens", "512",
                   "--loss-batches", "1", "--out", str(tmp_path / "eval.json")])
    assert rc == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["policy"] == "mask" and "dlm_delta" in result
    assert result["dlm_delta"]["mask_clean"] > 0 and "mask_delta" in result["dlm_delta"]


def test_bad_input_is_reported(tiny_llada, capsys):
    rc = cli.main(["train", "--model", str(tiny_llada), "--layers", "5", "--out", "unused"])
    assert rc == 2 and "layer" in capsys.readouterr().err
    rc = cli.main(["train", "--model", str(tiny_llada), "--layers", "0", "--policy", "masked", "--out", "unused",
                   "--sentences", "200", "--seq-len", "16"])
    assert rc == 2 and "policy" in capsys.readouterr().err


def test_train_on_a_jsonl_corpus_and_resume(tiny_llada, tmp_path):
    """`--corpus` a Hugging Face data file (streamed, EOS-joined); a second run with --resume reuses the
    finished checkpoints and ends with the same SAEs."""
    pytest.importorskip("datasets")
    corpus = tmp_path / "docs.jsonl"
    words = ["red", "blue", "cat", "dog", "the", "sky", "is", "two", "plus", "three"]
    corpus.write_text("".join(json.dumps({"body": " ".join(words[(i + j) % 10] for j in range(12))}) + "\n"
                              for i in range(400)))
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llada), "--corpus", str(corpus), "--text-field", "body", "--seq-len", "16",
            "--lm-batch", "8", "--batch-size", "64", "--layers", "1", "--k", "2", "--n", "32", "--tokens", "512",
            "--eval-tokens", "256", "--warmup", "1", "--log-every", "0", "--norm-batches", "1", "--out", str(out)]
    assert cli.main(args) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["corpus"] == str(corpus) and -1.0 < first["layers"]["1"]["2"]["fve"] <= 1.0
    assert cli.main(args + ["--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["layers"] == first["layers"]


@pytest.mark.parametrize("verb, extra", [
    ("order", ["--sae", "0=unused"]),
    ("transfer", ["--base", "unused", "--target", "unused", "--layers", "0"]),
])
def test_21_12_out_that_is_a_file_is_refused_before_any_work(verb, extra, tmp_path, capsys):
    """The model path does not exist: the --out check must come first, as one line, exit 2."""
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    model = [] if verb == "transfer" else ["--model", str(tmp_path / "no-model")]
    rc = cli.main([verb, *model, *extra, "--out", str(existing)])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "is a file" in err and "Traceback" not in err
    assert existing.read_text() == "mine"


@pytest.mark.parametrize("argv", [
    ["train", "--model", "m", "--layers", "0", "--out", "o", "--lm-batch", "0"],
    ["train", "--model", "m", "--layers", "0", "--out", "o", "--seq-len", "-3"],
    ["eval", "--model", "m", "--sae", "s", "--layer", "0", "--batch-size", "0"],
    ["order", "--model", "m", "--sae", "0=s", "--out", "o", "--top-k", "0"],
    ["transfer", "--base", "b", "--target", "t", "--layers", "0", "--out", "o", "--tokens", "0"],
])
def test_21_12_sizes_below_one_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_21_12_unknown_order_is_refused_before_the_model_loads(tmp_path, capsys):
    rc = cli.main(["order", "--model", str(tmp_path / "no-model"), "--sae", "0=unused", "--orders", "entropi",
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--orders" in err and "did you mean 'entropy'" in err
