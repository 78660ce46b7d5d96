"""Auto-interpretation, explain then detect (docs/reference.md §4, SAEBench's protocol as the paper ran it).

*Explain*: an explainer reads a latent's 10 top and 5 importance-weighted windows (tokens above 1% of the top
activation highlighted as ``<<token>>``) and names what it fires on (≤ 30 words). *Detect*: a judge sees 14
shuffled windows — 2 top, 2 importance-weighted (the positives) and 10 random windows (negatives, their
activations zeroed as in the paper) — and says for each whether the explanation fits; the score is the
accuracy over the 14.

Explainers: :class:`PlantedExplainer` (ground truth for a corpus with planted concepts, such as the embedded
world's: the planted concept whose words carry most of the highlighted activation), :class:`HFExplainer` (a local
transformers causal LM, greedy), and :class:`OpenAIExplainer` (an OpenAI-compatible endpoint through
:class:`~dlmscope.interp.judges.OpenAIJudge`'s client, with its retries and cache). Judges are those of
:mod:`dlmscope.interp.judges`. The planted judge decides on the window's centre token and its neighbours (a planted
concept is a property of tokens, and a random window's centre is where it was drawn); model judges read the whole
window. Explanations and judgements of the OpenAI path are cached on disk, so a re-run costs nothing; the planted
and HF paths are deterministic.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence

import torch

from .judges import OpenAIJudge, PlantedJudge, planted_vocabulary
from dlmscope.util.bootstrap import bootstrap_mean

__all__ = ["EXPLAIN_TOP", "EXPLAIN_IW", "DETECT_TOP", "DETECT_IW", "DETECT_RANDOM", "highlight",
           "PlantedExplainer", "HFExplainer", "OpenAIExplainer", "detection_windows", "detect", "score_report"]

EXPLAIN_TOP, EXPLAIN_IW = 10, 5
DETECT_TOP, DETECT_IW, DETECT_RANDOM = 2, 2, 10
#: tokens above this fraction of the latent's top activation are highlighted for the explainer
HIGHLIGHT_FRACTION = 0.01
EXPLAIN_PROMPT = ("Below are text windows where a feature of a language model fires; tokens where it fires are "
                  "marked <<like this>>. In at most 30 words, say what the feature detects.\n\n{windows}\n\n"
                  "The feature detects:")


def highlight(window: Mapping, max_act: float) -> str:
    """The window's text with the tokens above ``HIGHLIGHT_FRACTION · max_act`` marked ``<<token>>``."""
    cut = HIGHLIGHT_FRACTION * max_act
    return " ".join(f"<<{t}>>" if v > cut else t for t, v in zip(window["tokens"], window["values"]))


def _explain_windows(entry: Mapping) -> list[Mapping]:
    return list(entry["top"][:EXPLAIN_TOP]) + list(entry["importance"][:EXPLAIN_IW])


class PlantedExplainer:
    """Names the planted concept whose vocabulary carries the most activation in the explanation windows
    (``"none"`` when no highlighted token belongs to any concept); ``concepts``: name -> words, e.g. the
    embedded world's ``dlmscope.world.CONCEPTS``."""

    name = "planted"

    def __init__(self, *, concepts: Mapping[str, Sequence[str]]):
        self.vocab = planted_vocabulary(concepts)

    def explain(self, entry: Mapping) -> str:
        mass = dict.fromkeys(self.vocab, 0.0)
        for w in _explain_windows(entry):
            for t, v in zip(w["tokens"], w["values"]):
                for name, words in self.vocab.items():
                    if t.lower() in words:
                        mass[name] += v
        best = max(mass, key=mass.get)
        return best if mass[best] > 0 else "none"


class HFExplainer:
    """A local causal LM (transformers model + tokenizer) completes :data:`EXPLAIN_PROMPT` greedily; the
    first line of the completion, cut to 30 words, is the explanation."""

    name = "hf"

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 40):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    @torch.no_grad()
    def explain(self, entry: Mapping) -> str:
        prompt = EXPLAIN_PROMPT.format(windows="\n".join(highlight(w, entry["max_act"])
                                                         for w in _explain_windows(entry)))
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(self.model.parameters()).device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(input_ids=ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=pad)
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        return " ".join(text.splitlines()[0].split()[:30]) if text else ""


class OpenAIExplainer:
    """An OpenAI-compatible chat endpoint asked for JSON ``{"explanation": "..."}``; requests, retries and the
    disk cache are those of the :class:`~dlmscope.interp.judges.OpenAIJudge` passed in."""

    name = "openai"

    def __init__(self, client: OpenAIJudge):
        self.client = client

    def explain(self, entry: Mapping) -> str | None:
        prompt = EXPLAIN_PROMPT.format(windows="\n".join(highlight(w, entry["max_act"])
                                                         for w in _explain_windows(entry)))
        system = "You explain features of language models. Reply with JSON {\"explanation\": \"...\"}."

        def parse(content: dict) -> str:
            return " ".join(str(content["explanation"]).split()[:30])

        return self.client.cached(["explain", prompt],
                                  lambda: self.client.chat_json(system, prompt, parse))


def detection_windows(entry: Mapping, random_windows: Sequence[Mapping], seed: int) -> tuple[list[Mapping], list[bool]]:
    """The 14 shuffled detection windows and their labels (True: the latent fires there). Positives are top
    windows after the ones the explainer saw when there are enough (else the first ones) and importance-weighted
    ones likewise; negatives are random windows, drawn with ``seed``."""
    rng = random.Random(seed)
    top, iw = list(entry["top"]), list(entry["importance"])
    pos_top = top[EXPLAIN_TOP:EXPLAIN_TOP + DETECT_TOP] or top[:DETECT_TOP]
    pos_iw = iw[EXPLAIN_IW:EXPLAIN_IW + DETECT_IW] or iw[:DETECT_IW]
    if len(random_windows) < DETECT_RANDOM:
        raise ValueError(f"detection needs {DETECT_RANDOM} random windows, the report has {len(random_windows)}")
    negatives = [dict(w, centre=rng.randrange(len(w["tokens"])) if w["tokens"] else 0)
                 for w in rng.sample(list(random_windows), DETECT_RANDOM)]
    windows = [(w, True) for w in pos_top + pos_iw] + [(w, False) for w in negatives]
    rng.shuffle(windows)
    return [w for w, _ in windows], [lab for _, lab in windows]


def _judge_text(window: Mapping, planted: bool) -> str:
    if not planted:
        return " ".join(window["tokens"])
    c = window.get("centre", len(window["tokens"]) // 2)
    return " ".join(window["tokens"][max(0, c - 1):c + 2])


def detect(entry: Mapping, explanation: str, judge, random_windows: Sequence[Mapping], *, seed: int = 0,
           threshold: float | None = None) -> dict:
    """``{"accuracy", "balanced_accuracy", "n", "predicted", "labels"}``: the judge's decisions on the
    detection windows (``score > threshold``; default 0 for the planted judge — any concept word — and 0.5
    otherwise). Failed judgements count as wrong. An explanation of ``"none"`` predicts no window, which scores
    10/14 = 0.714 accuracy (every negative right) but 0.5 balanced accuracy: the paper's means (0.73–0.77)
    are accuracies, so read them against 0.714."""
    windows, labels = detection_windows(entry, random_windows, seed)
    planted = isinstance(judge, PlantedJudge)
    if threshold is None:
        threshold = 0.0 if planted else 0.5
    if explanation in ("none", "") or (planted and explanation not in judge.vocab):
        scores = [0.0] * len(windows)
    else:
        scores = judge.score(explanation, [_judge_text(w, planted) for w in windows])
    predicted = [s is not None and s > threshold for s in scores]
    right = [p == lab and s is not None for p, lab, s in zip(predicted, labels, scores)]
    pos = [r for r, lab in zip(right, labels) if lab]
    neg = [r for r, lab in zip(right, labels) if not lab]
    balanced = (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2 if pos and neg else float("nan")
    return {"accuracy": sum(right) / len(right), "balanced_accuracy": balanced, "n": len(right),
            "predicted": predicted, "labels": labels}


def score_report(report: dict, explainer, judge, *, seed: int = 0) -> dict:
    """Explain and detect every latent of a :func:`dlmscope.interp.features.feature_report`; writes
    ``latents[id]["interp"] = {"explanation", "accuracy", "balanced_accuracy", "judge", "explainer"}`` into the
    report and returns (and stores as ``report["interp_summary"]``) the means over latents with bootstrap
    intervals: ``accuracy``, ``balanced_accuracy``, ``accuracy_explained`` (latents with an explanation other
    than "none"), ``explained_fraction`` and ``chance_accuracy`` (an explainer that says "none": 10/14).

    When the explainer or the judge raises part-way (an endpoint gone or refusing), the error propagates, but
    the latents scored before it keep their scores and the summary covers them, with ``complete`` False."""
    if "latents" not in report or "random_windows" not in report:
        raise ValueError("score_report needs a feature report (dlmscope.interp.features.feature_report)")
    accs = []
    complete = False
    try:
        for key, entry in report["latents"].items():
            explanation = explainer.explain(entry)
            if explanation is None:                   # the explainer's call failed: no score for this latent
                continue
            d = detect(entry, explanation, judge, report["random_windows"], seed=seed + int(key))
            entry["interp"] = {"explanation": explanation, "accuracy": d["accuracy"],
                               "balanced_accuracy": d["balanced_accuracy"], "judge": type(judge).__name__,
                               "explainer": explainer.name}
            accs.append((d["accuracy"], d["balanced_accuracy"], explanation not in ("none", "")))
        complete = True
    finally:
        report["interp_summary"] = _summary(accs, seed, complete)
    return report["interp_summary"]


def _summary(accs: list[tuple[float, float, bool]], seed: int, complete: bool) -> dict:
    ci = lambda xs: dataclasses.asdict(bootstrap_mean(xs, seed=seed)) if xs else None  # noqa: E731
    return {"n": len(accs), "accuracy": ci([a for a, _, _ in accs]), "balanced_accuracy": ci([b for _, b, _ in accs]),
            "explained_fraction": sum(e for _, _, e in accs) / len(accs) if accs else float("nan"),
            "accuracy_explained": ci([a for a, _, e in accs if e]),
            "chance_accuracy": DETECT_RANDOM / (DETECT_TOP + DETECT_IW + DETECT_RANDOM), "complete": complete}
