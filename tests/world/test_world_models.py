"""The embedded world's committed tiny models (dlmscope/world/assets/models/): formats and quality.

These tests load the committed checkpoints and never train (``python -m dlmscope.world.build`` does).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from dlmscope.world import ASSETS_DIR
from dlmscope.world import corpus as C
from dlmscope.world import train_models as TM

MODELS_DIR = os.path.join(ASSETS_DIR, "models")
MODELS = ("dlm", "ar", "ar_matched", "instruct", "placebo")
pytestmark = pytest.mark.skipif(not all(os.path.isfile(os.path.join(MODELS_DIR, n, "model.safetensors"))
                                        for n in MODELS),
                                reason="world models not built (python -m dlmscope.world.build)")

#: margins the committed models must clear (the measured values are in world.json["models"])
MASKED_ACC_MARGIN = 0.25     # DLM masked-token accuracy at t=0.15 minus the unigram baseline's
AR_PPL_RATIO = 0.5           # AR held-out perplexity must be below this fraction of the unigram perplexity
PLACEBO_QA_GAP = 0.05        # the placebo's one-shot Q&A within this of the DLM's; the instruct twin's above it by more


def _load(name):
    from dlmscope import models

    return models.load(os.path.join(MODELS_DIR, name))


@pytest.fixture(scope="module")
def adapters():
    torch.manual_seed(0)
    return {n: _load(n) for n in MODELS}


@pytest.fixture(scope="module")
def tok():
    from dlmscope.world.tokenizer import load_tokenizer

    return load_tokenizer(os.path.join(ASSETS_DIR, "tokenizer"))


@pytest.fixture(scope="module")
def data(tok):
    """A held-out slice of the committed world's corpus (the first samples of the same generator and seed, on
    the held-out side of the same hash split) plus training-side unigram counts."""
    cfg = json.load(open(os.path.join(ASSETS_DIR, "world.json")))["config"]
    pre = C.generate(12000, seed=cfg["seed"])
    train, held = C.split(pre, cfg["heldout_frac"], seed=cfg["seed"])
    qa = C.generate(4000, seed=cfg["seed"] + 1, mix={"qa": 1.0})
    _, qa_held = C.split(qa, cfg["heldout_frac"], seed=cfg["seed"])
    held_ids = C.pack(held, tok, cfg["seq_len"])
    unigram = TM.unigram_counts(C.pack(train, tok, cfg["seq_len"]), len(tok), tok.pad_token_id)
    return {"held": held_ids, "unigram": unigram, "qa_held": qa_held}


def _state_keys(name):
    from safetensors import safe_open

    with safe_open(os.path.join(MODELS_DIR, name, "model.safetensors"), "pt") as f:
        return set(f.keys())


def _config(name):
    with open(os.path.join(MODELS_DIR, name, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["dlm", "instruct", "placebo"])
def test_dlm_checkpoints_are_llada_format(name, adapters, tok):
    cfg = _config(name)
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    for field in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "embedding_size",
                  "rope_theta", "rms_norm_eps", "weight_tying", "include_bias", "mask_token_id"):
        assert field in cfg, field
    keys = _state_keys(name)
    assert "model.transformer.wte.weight" in keys and "model.transformer.ln_f.weight" in keys
    assert "model.transformer.ff_out.weight" in keys
    assert f"model.transformer.blocks.{cfg['n_layers'] - 1}.attn_out.weight" in keys
    assert not any(k.startswith("model.layers.") for k in keys)
    a = adapters[name]
    assert a.family == "llada" and a.num_layers == cfg["n_layers"] and a.logit_shift == 0
    # the mask id agrees everywhere: checkpoint config, adapter, the model dir's tokenizer, the world tokenizer
    from transformers import PreTrainedTokenizerFast

    dir_tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(MODELS_DIR, name))
    assert cfg["mask_token_id"] == a.mask_token_id == dir_tok.mask_token_id == tok.mask_token_id
    assert dir_tok.get_vocab() == tok.get_vocab() and a.tokenizer.get_vocab() == tok.get_vocab()
    assert cfg["embedding_size"] == cfg["vocab_size"] == len(tok)


@pytest.mark.parametrize("name", ["ar", "ar_matched"])
def test_ar_checkpoint_is_llama_format(name, adapters, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config(name)
    assert cfg["model_type"] == "llama" and cfg.get("is_causal", True) is not False
    keys = _state_keys(name)
    assert "model.embed_tokens.weight" in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    a = adapters[name]
    assert a.family == "llama" and a.mask_token_id is None
    direct = AutoModelForCausalLM.from_pretrained(os.path.join(MODELS_DIR, name))
    x = torch.tensor([tok("the capital of france is paris .")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(direct(input_ids=x).logits, a.logits(x))
    assert AutoTokenizer.from_pretrained(os.path.join(MODELS_DIR, name)).get_vocab() == tok.get_vocab()
    # same architecture as the DLM
    d = _config("dlm")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (
        d["d_model"], d["n_layers"], d["mlp_hidden_size"])


def test_sizes_are_small():
    for name in MODELS:
        size = os.path.getsize(os.path.join(MODELS_DIR, name, "model.safetensors"))
        assert 0.5e6 < size < 10.5e6, (name, size)


def test_dlm_is_bidirectional_ar_is_causal(adapters, data):
    x = data["held"][:2].clone()
    y = x.clone()
    y[:, -1] = (y[:, -1] + 7) % 400 + 5
    with torch.no_grad():
        for name in ("dlm", "instruct", "placebo"):
            a = adapters[name]
            assert (a.logits(x)[:, 0] - a.logits(y)[:, 0]).abs().max() > 1e-3, name
        for name in ("ar", "ar_matched"):
            ar = adapters[name]
            torch.testing.assert_close(ar.logits(x)[:, :-1], ar.logits(y)[:, :-1])


def test_dlm_masked_accuracy_beats_unigram(adapters, data, tok):
    res = {r: TM.masked_accuracy(adapters["dlm"].model, data["held"], r, tok.mask_token_id, tok.pad_token_id,
                                 data["unigram"], seed=1) for r in (0.15, 0.5)}
    assert res[0.15]["n_masked"] > 200
    assert res[0.15]["accuracy"] > res[0.15]["unigram_accuracy"] + MASKED_ACC_MARGIN, res
    assert res[0.5]["accuracy"] > res[0.5]["unigram_accuracy"] + MASKED_ACC_MARGIN / 2, res
    # more context, better predictions
    assert res[0.15]["accuracy"] > res[0.5]["accuracy"]


def test_ar_perplexity_beats_unigram(adapters, data):
    res = {name: TM.ar_perplexity(adapters[name].model, data["held"], data["unigram"]) for name in ("ar", "ar_matched")}
    for r in res.values():
        assert r["ppl"] < AR_PPL_RATIO * r["unigram_ppl"], res
    # the budget-matched twin ends on the task-rich annealing mix, so on plain held-out text it sits a little above the
    # init twin (world.json: 3.82 vs 3.44), far below the unigram model
    assert res["ar_matched"]["ppl"] < 1.25 * res["ar"]["ppl"], res


def test_instruct_answers_qa_better_than_base(adapters, data, tok):
    items = data["qa_held"]
    assert len(items) > 100
    base = TM.qa_accuracy(adapters["dlm"].model, items, tok, 32)["accuracy"]
    inst = TM.qa_accuracy(adapters["instruct"].model, items, tok, 32)["accuracy"]
    assert inst > base, (inst, base)


def test_placebo_did_not_learn_qa(adapters, data, tok):
    """The placebo twin took the instruct twin's fine-tuning on base sentences only: its one-shot Q&A stays at
    the DLM's (world.json: 0.607 vs 0.601 on the full held-out slice), far below the instruct twin's (0.734)."""
    items = data["qa_held"]
    acc = {n: TM.qa_accuracy(adapters[n].model, items, tok, 32)["accuracy"] for n in ("dlm", "instruct", "placebo")}
    assert abs(acc["placebo"] - acc["dlm"]) < PLACEBO_QA_GAP, acc
    assert acc["instruct"] > acc["placebo"] + PLACEBO_QA_GAP, acc


def test_world_json_records_model_metrics():
    meta = json.load(open(os.path.join(ASSETS_DIR, "world.json")))
    m = meta["models"]
    for key in ("dlm_masked", "ar", "ar_matched", "qa_accuracy", "quality", "model_config", "train_config",
                "file_bytes", "training"):
        assert key in m, key
    assert m["dlm_masked"]["t=0.15"]["accuracy"] > m["dlm_masked"]["t=0.15"]["unigram_accuracy"]
    assert m["ar"]["ppl"] < m["ar"]["unigram_ppl"]
    # each model's steps, rows, tokens and data are recorded; the matched twin has read exactly the DLM's
    tr = m["training"]
    assert tr["ar_matched"]["total"] == tr["dlm"]["total"] == {"steps": 6700, "rows": 428_800, "tokens": 27_443_200}
    assert tr["ar"]["total"]["steps"] == 1200 and [p["data"] for p in tr["ar_matched"]["phases"]] == [
        p["data"] for p in tr["dlm"]["phases"]]
    # the placebo twin: the instruct twin's fine-tuning budget from the same init, on base sentences only
    assert tr["placebo"]["total"] == tr["instruct"]["total"] == {"steps": 600, "rows": 38_400, "tokens": 1_228_800}
    assert tr["placebo"]["init"] == tr["instruct"]["init"] == "the DLM"
    assert tr["placebo"]["phases"][0]["data"] == "base sentences only (placebo)"
    qa = m["qa_accuracy"]
    assert abs(qa["placebo"]["accuracy"] - qa["dlm"]["accuracy"]) < PLACEBO_QA_GAP < (
        qa["instruct"]["accuracy"] - qa["placebo"]["accuracy"]), qa


# ---------------------------------------------------------------------------------------------- task quality
#: Exact match the models must reach on in-distribution tasks (issue 9's aim), per (model, kind); kinds a
#: model is not asked to know (the base models' Q&A is the instruct twin's job) have the bar below.
AIM = 0.8
#: Below the aim at this size (8 blocks, d_model 128, a 53-minute CPU build): the DLM's two-step chains
#: (measured 0.50) and Q&A (0.69), the instruct twin's chains (0.40), the placebo twin's chains (0.35) and
#: Q&A (0.69, the DLM's: it never saw the Q&A slice); see docs/world.md. The bars sit just under the measured
#: values, so a rebuild that loses ground fails.
BARS = {("dlm", "arith_chain"): 0.45, ("dlm", "qa"): 0.65, ("instruct", "arith_chain"): 0.35,
        ("placebo", "arith_chain"): 0.30, ("placebo", "qa"): 0.65}
#: how far a re-measurement may sit from world.json's record (argmax ties on another CPU)
RECORD_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def shipped_tasks():
    return C.load_tasks(os.path.join(ASSETS_DIR, "tasks.jsonl"))


@pytest.fixture(scope="module")
def measured_quality(adapters, shipped_tasks, tok):
    from dlmscope.world.quality import task_quality

    tasks, heldout = shipped_tasks
    return {name: task_quality(adapters[name], tasks, heldout, tok, causal=name.startswith("ar"))
            for name in MODELS}


def test_quality_matches_world_json(measured_quality):
    recorded = json.load(open(os.path.join(ASSETS_DIR, "world.json")))["models"]["quality"]
    for name, q in measured_quality.items():
        for split in ("in_distribution", "heldout"):
            assert set(q[split]) == set(recorded[name][split]), (name, split)
            for kind, cell in q[split].items():
                rec = recorded[name][split][kind]
                assert cell["n"] == rec["n"]
                assert abs(cell["exact_match"] - rec["exact_match"]) <= RECORD_TOLERANCE, (name, split, kind, cell, rec)


def test_models_know_the_world(measured_quality):
    """The aim of the world: both base models know every in-distribution task kind; the instruct twin
    answers the Q&A slice and keeps the base facts; so does the placebo twin, Q&A aside."""
    for name, kinds in (("dlm", C.SCORED_KINDS), ("ar", C.SCORED_KINDS), ("ar_matched", C.SCORED_KINDS),
                        ("instruct", C.SCORED_KINDS), ("placebo", C.SCORED_KINDS)):
        q = measured_quality[name]["in_distribution"]
        for kind in kinds:
            if kind in q:
                assert q[kind]["exact_match"] >= BARS.get((name, kind), AIM), (name, kind, q[kind])


def test_placebo_qa_stays_at_the_dlm(measured_quality):
    """Exact match on the Q&A tasks: the instruct twin's gain over the DLM (0.69 -> 0.92) comes from the Q&A
    slice, not from fine-tuning as such: the placebo twin stays at the DLM's (0.69)."""
    qa = {n: measured_quality[n]["in_distribution"]["qa"]["exact_match"] for n in ("dlm", "instruct", "placebo")}
    assert abs(qa["placebo"] - qa["dlm"]) <= 0.1 and qa["instruct"] >= qa["placebo"] + 0.15, qa
