"""dlmscope.interp.autointerp: the planted explainer and detection on hand-built windows with known answers, the
"none" baseline, an OpenAI-compatible explainer against a real loopback server (cached), and a report."""
from __future__ import annotations

import json

import pytest
import torch

from dlmscope.interp.autointerp import (PlantedExplainer, HFExplainer, OpenAIExplainer, compare_reports, detect,
                                        detection_windows, highlight, score_report)
from dlmscope.interp.judges import JudgeUnreachable, OpenAIJudge, PlantedJudge
from dlmscope.world import CONCEPTS

from tests.helpers.chat_server import ChatHandler, serving


def _win(words, hot):
    """A window whose ``hot`` word carries activation 2 (its centre)."""
    ws = words.split()
    return {"tokens": ws, "values": [2.0 if w == hot else 0.0 for w in ws], "centre": ws.index(hot)}


FOOD = ["anna ate the bread", "he likes rice a lot", "the cake is sweet", "a soup for dinner"]
ENTRY = {"max_act": 2.0,
         "top": [_win(t, t.split()[i]) for t, i in zip(FOOD * 3, [3, 2, 1, 1] * 3)],
         "importance": [_win(t, t.split()[i]) for t, i in zip(FOOD * 2, [3, 2, 1, 1] * 2)]}
RANDOM = [{"tokens": f"the {w} walked to the house".split()} for w in ("man", "dog", "cat", "bird", "girl",
                                                                         "boy", "king", "queen", "fox", "cow", "hen")]


def test_planted_explainer_names_the_concept_that_carries_the_activation():
    assert PlantedExplainer(concepts=CONCEPTS).explain(ENTRY) == "food"
    flat = {"max_act": 1.0, "top": [_win("the of a", "of")], "importance": []}
    assert PlantedExplainer(concepts=CONCEPTS).explain(flat) == "none"
    assert highlight(_win("anna ate the bread", "bread"), 2.0) == "anna ate the <<bread>>"


def test_detection_accuracy_known_answers():
    windows, labels = detection_windows(ENTRY, RANDOM, seed=3)
    assert len(windows) == 14 and sum(labels) == 4
    assert detection_windows(ENTRY, RANDOM, seed=3) == (windows, labels)       # seeded
    right = detect(ENTRY, "food", PlantedJudge(concepts=CONCEPTS), RANDOM, seed=3)
    assert right["accuracy"] == 1.0 and right["balanced_accuracy"] == 1.0
    none = detect(ENTRY, "none", PlantedJudge(concepts=CONCEPTS), RANDOM, seed=3)
    assert none["accuracy"] == pytest.approx(10 / 14) and none["balanced_accuracy"] == 0.5
    wrong = detect(ENTRY, "colour", PlantedJudge(concepts=CONCEPTS), RANDOM, seed=3)
    assert wrong["accuracy"] == pytest.approx(10 / 14)
    with pytest.raises(ValueError, match="random windows"):
        detection_windows(ENTRY, RANDOM[:3], seed=0)


class _Explain(ChatHandler):
    def content(self, body):
        user = body["messages"][-1]["content"]
        return json.dumps({"explanation": "food words " + " ".join(["x"] * 40)} if "bread" in user else {})


def test_openai_explainer_against_a_loopback_server_is_cached(tmp_path):
    with serving(_Explain) as srv:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        client = OpenAIJudge(url, "m", "k", retries=2, backoff=0.0, cache_path=str(tmp_path / "cache.json"))
        text = OpenAIExplainer(client).explain(ENTRY)
        assert text.startswith("food words") and len(text.split()) == 30            # cut to 30 words
        assert "<<bread>>" in srv.seen[0]["messages"][-1]["content"]
        again = OpenAIExplainer(OpenAIJudge(url, "m", "k", cache_path=str(tmp_path / "cache.json")))
        assert again.explain(ENTRY) == text and len(srv.seen) == 1                 # the re-run costs nothing
        bad = {"max_act": 1.0, "top": [_win("a b", "a")], "importance": []}
        bad["top"][0]["values"] = [0.0, 0.0]                            # nothing highlighted: malformed reply
        assert OpenAIExplainer(client).explain(bad) is None and client.failures == 1


def test_hf_explainer_runs_a_local_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlmscope.world import TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer(TOKENIZER_DIR)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    text = HFExplainer(model, tok, max_new_tokens=5).explain(ENTRY)
    assert isinstance(text, str) and len(text.split()) <= 30


def test_score_report_fills_interp_and_summarises():
    report = {"random_windows": RANDOM, "latents": {"3": dict(ENTRY), "4": {"max_act": 1.0,
              "top": [_win("the of a", "of")] * 4, "importance": [_win("the of a", "of")] * 2}}}
    s = score_report(report, PlantedExplainer(concepts=CONCEPTS), PlantedJudge(concepts=CONCEPTS))
    interp = report["latents"]["3"]["interp"]
    assert interp["explanation"] == "food" and interp["accuracy"] == 1
    assert report["latents"]["4"]["interp"]["explanation"] == "none"
    assert s["n"] == 2 and s["explained_fraction"] == 0.5 and s["chance_accuracy"] == pytest.approx(10 / 14)
    assert s["accuracy_explained"]["mean"] == 1.0 and report["interp_summary"] == s
    # the floor beside every accuracy: the explained latent's, and both latents' (the "none" one sits at it)
    assert s["accuracy_explained"]["floor"] == pytest.approx(10 / 14)
    assert s["accuracy"]["floor"] == pytest.approx(10 / 14)
    assert s["accuracy"]["mean"] == pytest.approx((1 + 10 / 14) / 2)
    assert s["accuracy"]["above_floor"]["mean"] == pytest.approx((1 - 10 / 14) / 2)
    assert s["balanced_accuracy"]["floor"] == 0.5 and s["accuracy"]["over"] == {"latents": 2}
    with pytest.raises(ValueError, match="feature report"):
        score_report({"latents": {}}, PlantedExplainer(concepts=CONCEPTS), PlantedJudge(concepts=CONCEPTS))


class _DiesOnSecond:
    """An explainer whose endpoint goes away after the first latent."""

    name = "dies"

    def __init__(self):
        self.planted, self.calls = PlantedExplainer(concepts=CONCEPTS), 0

    def explain(self, entry):
        self.calls += 1
        if self.calls > 1:
            raise JudgeUnreachable("judge endpoint gone")
        return self.planted.explain(entry)


def test_21_8_score_report_keeps_what_was_scored_when_the_judge_fails_late():
    """A judge failing mid-run raises, but the latents scored before it keep their scores and the summary
    covers them, so the caller can still write the report."""
    report = {"random_windows": RANDOM, "latents": {"3": dict(ENTRY), "4": dict(ENTRY)}}
    with pytest.raises(JudgeUnreachable):
        score_report(report, _DiesOnSecond(), PlantedJudge(concepts=CONCEPTS))
    assert report["latents"]["3"]["interp"]["accuracy"] == 1.0 and "interp" not in report["latents"]["4"]
    s = report["interp_summary"]
    assert s["n"] == 1 and s["accuracy"]["mean"] == 1.0 and s["complete"] is False


class _AlwaysNo:
    """A model judge that answers "no" to every window, whatever the explanation."""

    def score(self, concept, texts):
        return [0.0] * len(texts)


def test_22_8_floor_is_the_always_no_accuracy_on_the_latents_own_windows():
    """The floor is computed per latent on its windows (not 10/14 hard-coded): a latent with two positive
    windows has floor 10/12, and an always-"no" judge scores exactly the floor whatever the explanation."""
    few = {"max_act": 2.0, "top": ENTRY["top"][:1], "importance": ENTRY["importance"][:1]}
    report = {"random_windows": RANDOM, "latents": {"3": dict(ENTRY), "7": few}}
    s = score_report(report, PlantedExplainer(concepts=CONCEPTS), _AlwaysNo())
    floors = {k: e["interp"]["floor"] for k, e in report["latents"].items()}
    assert floors == {"3": pytest.approx(10 / 14), "7": pytest.approx(10 / 12)}
    for key, entry in report["latents"].items():
        windows, labels = detection_windows(entry, RANDOM, seed=int(key))
        assert entry["interp"]["floor"] == pytest.approx(labels.count(False) / len(labels))
        assert entry["interp"]["accuracy"] == entry["interp"]["floor"]            # always "no" = the floor
        assert detect(entry, "food", _AlwaysNo(), RANDOM, seed=int(key))["accuracy"] == entry["interp"]["floor"]
    assert s["chance_accuracy"] == pytest.approx((10 / 14 + 10 / 12) / 2)
    assert s["accuracy"]["above_floor"]["mean"] == 0 and s["accuracy_explained"]["floor"] == s["chance_accuracy"]


def _scored(accuracies, floor=10 / 14):
    """A scored report whose latents have these accuracies (all explained, one floor)."""
    return {"latents": {str(i): {"interp": {"explanation": "food", "accuracy": a, "balanced_accuracy": a,
                                            "floor": floor, "balanced_floor": 0.5}}
                        for i, a in enumerate(accuracies)}}


def test_22_8_two_report_difference_interval_over_latents():
    """Two reports drawn from one distribution: the interval of A − B covers 0; B shifted down by 0.1 (about two
    standard errors of 60 latents' mean apart, times three): it excludes 0. Each report keeps its floor."""
    g = torch.Generator().manual_seed(0)
    draw = lambda n: (torch.randint(8, 15, (n,), generator=g).double() / 14).tolist()  # noqa: E731
    a, b = draw(60), draw(80)
    same = compare_reports(_scored(a), _scored(b))
    assert same["difference"]["low"] < 0 < same["difference"]["high"]
    assert same["difference"]["over"] == {"latents_a": 60, "latents_b": 80}
    assert same["a"]["floor"] == pytest.approx(10 / 14) and same["a"]["n"] == 60 and same["b"]["n"] == 80
    shifted = compare_reports(_scored(a), _scored([x - 0.1 for x in b]))
    assert shifted["difference"]["low"] > 0
    assert shifted["difference"]["mean"] == pytest.approx(sum(a) / 60 - sum(b) / 80 + 0.1)
    # a lower floor for B (fewer positives per latent) is taken out by the margin above the floor
    floor_b = compare_reports(_scored(a), _scored([x - 0.1 for x in b], floor=10 / 14 - 0.1))
    m = floor_b["difference_above_floor"]
    assert m["low"] < 0 < m["high"] and floor_b["b"]["floor"] == pytest.approx(10 / 14 - 0.1)
    with pytest.raises(ValueError, match="floor"):
        compare_reports({"latents": {"0": {"interp": {"explanation": "x", "accuracy": 1.0}}}}, _scored(a))
