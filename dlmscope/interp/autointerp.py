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

The floor. Most windows are negatives, so an explanation that matches nothing is mostly right: an empty
explanation scores negatives / windows (10/14 ≈ 0.714 with four positives). Every latent's floor is computed on
its own windows with the same judge (:func:`score_report`), and every accuracy in the summary
(:func:`interp_summary`) carries the mean floor of the same latents and the interval of its margin above it.
:func:`compare_reports` gives the difference between two reports (a DLM SAE vs its AR twin's) with an interval
over latents, each report's latents resampled independently
(:func:`dlmscope.util.bootstrap.two_sample_difference`).
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence

import torch

from .judges import OpenAIJudge, PlantedJudge, planted_vocabulary
from dlmscope.util.bootstrap import bootstrap_mean, paired_difference, two_sample_difference

__all__ = ["EXPLAIN_TOP", "EXPLAIN_IW", "DETECT_TOP", "DETECT_IW", "DETECT_RANDOM", "highlight",
           "PlantedExplainer", "HFExplainer", "OpenAIExplainer", "detection_windows", "detect", "score_report",
           "explained", "interp_summary", "compare_reports"]

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
    ``latents[id]["interp"] = {"explanation", "accuracy", "balanced_accuracy", "floor", "balanced_floor",
    "judge", "explainer"}`` into the report and returns (and stores as ``report["interp_summary"]``)
    :func:`interp_summary` of them.

    ``floor`` is :func:`detect`'s accuracy for an empty explanation on the same latent's windows with the same
    judge: :func:`detect` predicts no window for it without asking the judge (it names nothing to match), so the
    floor is negatives / windows — 10/14 when the latent has 4 positive windows, more when it has fewer — the
    score an explainer gets for saying nothing, against which every accuracy is read.

    When the explainer or the judge raises part-way (an endpoint gone or refusing), the error propagates, but
    the latents scored before it keep their scores and the summary covers them, with ``complete`` False."""
    if "latents" not in report or "random_windows" not in report:
        raise ValueError("score_report needs a feature report (dlmscope.interp.features.feature_report)")
    scored = []
    complete = False
    try:
        for key, entry in report["latents"].items():
            explanation = explainer.explain(entry)
            if explanation is None:                   # the explainer's call failed: no score for this latent
                continue
            d = detect(entry, explanation, judge, report["random_windows"], seed=seed + int(key))
            empty = detect(entry, "", judge, report["random_windows"], seed=seed + int(key))   # same windows
            entry["interp"] = {"explanation": explanation, "accuracy": d["accuracy"],
                               "balanced_accuracy": d["balanced_accuracy"], "floor": empty["accuracy"],
                               "balanced_floor": empty["balanced_accuracy"], "judge": type(judge).__name__,
                               "explainer": explainer.name}
            scored.append(entry["interp"])
        complete = True
    finally:
        report["interp_summary"] = interp_summary(scored, seed=seed, complete=complete)
    return report["interp_summary"]


def explained(interp: Mapping) -> bool:
    """Whether a latent's ``interp`` holds an explanation (not ``"none"`` or empty)."""
    return interp.get("explanation") not in ("none", "", None)


def _with_floor(values: Sequence[float], floors: Sequence[float], seed: int) -> dict | None:
    """The mean of ``values`` with its interval over latents, the mean floor of the same latents beside it, and
    the interval of the paired margin above the floor."""
    if not values:
        return None
    out = dataclasses.asdict(bootstrap_mean(values, seed=seed, unit="latents"))
    out["floor"] = float(torch.tensor(floors, dtype=torch.float64).nanmean())
    out["above_floor"] = dataclasses.asdict(paired_difference(floors, values, seed=seed, unit="latents"))
    return out


def interp_summary(interps: Sequence[Mapping], *, seed: int = 0, complete: bool = True) -> dict:
    """Means over latents of their ``interp`` dicts, each with its bootstrap interval over latents and the
    floor beside it: ``accuracy`` and ``accuracy_explained`` (the latents with an explanation other than "none")
    each carry ``floor`` (the mean accuracy of an empty explanation on the same latents' windows) and
    ``above_floor`` (the paired margin's interval); ``balanced_accuracy`` likewise (its floor is 0.5).
    ``chance_accuracy`` is the floor over all scored latents (a number, for printing); ``explained_fraction``
    the fraction explained."""
    acc = [i["accuracy"] for i in interps]
    floor = [i["floor"] for i in interps]
    bal = [i["balanced_accuracy"] for i in interps]
    bal_floor = [i.get("balanced_floor", 0.5) for i in interps]
    exp = [explained(i) for i in interps]
    pick = lambda xs: [x for x, e in zip(xs, exp) if e]  # noqa: E731
    return {"n": len(interps), "accuracy": _with_floor(acc, floor, seed),
            "balanced_accuracy": _with_floor(bal, bal_floor, seed),
            "explained_fraction": sum(exp) / len(exp) if exp else float("nan"), "n_explained": sum(exp),
            "accuracy_explained": _with_floor(pick(acc), pick(floor), seed),
            "chance_accuracy": float(torch.tensor(floor, dtype=torch.float64).mean()) if floor else float("nan"),
            "floor_is": "the accuracy of an empty explanation on the same latents' windows, same judge",
            "complete": complete}


def compare_reports(report_a: Mapping, report_b: Mapping, *, metric: str = "accuracy", explained_only: bool = False,
                    level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """The difference A − B of a detection metric between two scored reports (e.g. a DLM SAE's and its AR
    twin's), with an interval over latents (:func:`~dlmscope.util.bootstrap.two_sample_difference`: the latents of
    each report resampled independently). Returns ``{"metric", "explained_only", "difference",
    "difference_above_floor", "a", "b"}``: ``difference`` of the means, ``difference_above_floor`` of the margins
    ``metric − floor`` (a fairer contrast when the two reports' floors differ), and per report the mean with its
    interval, ``floor`` (the mean floor of the same latents) and ``n``. ``metric``: ``"accuracy"`` or
    ``"balanced_accuracy"``; ``explained_only``: only latents with an explanation other than "none"."""
    if metric not in ("accuracy", "balanced_accuracy"):
        raise ValueError(f"metric must be 'accuracy' or 'balanced_accuracy', got {metric!r}")
    floor_key = "floor" if metric == "accuracy" else "balanced_floor"
    sides = []
    for name, report in (("a", report_a), ("b", report_b)):
        interps = [e["interp"] for e in report.get("latents", {}).values() if "interp" in e]
        if any(floor_key not in i for i in interps):
            raise ValueError(f"report {name}: a latent's interp has no {floor_key!r}; score it with score_report")
        interps = [i for i in interps if explained(i) or not explained_only]
        sides.append(([i[metric] for i in interps], [i[floor_key] for i in interps]))
    kw = dict(level=level, resamples=resamples, seed=seed, unit="latents")
    out = {"metric": metric, "explained_only": explained_only,
           "difference": dataclasses.asdict(two_sample_difference(sides[0][0], sides[1][0], **kw)),
           "difference_above_floor": dataclasses.asdict(two_sample_difference(
               *([v - f for v, f in zip(*side)] for side in sides), **kw))}
    for name, (values, floors) in zip(("a", "b"), sides):
        side = _with_floor(values, floors, seed) or {"mean": float("nan"), "floor": float("nan")}
        out[name] = {"mean": side["mean"], "interval": [side.get("low"), side.get("high")], "floor": side["floor"],
                     "above_floor": side.get("above_floor"), "n": len(values)}
    return out
