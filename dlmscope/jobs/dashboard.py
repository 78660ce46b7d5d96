"""The ``dlmscope dashboard`` job: a feature report of one SAE, its planted-concept F1 per latent (embedded
world), auto-interp scores, and the static dashboard.

:func:`build_report` runs :func:`dlmscope.interp.features.feature_report` on held-out text, adds each latent's best
planted concept and its F1 (:mod:`dlmscope.interp.concepts`) when the text is the world's, and scores the latents
with an explainer and a judge (:mod:`dlmscope.interp.autointerp`).
"""
from __future__ import annotations

from collections.abc import Sequence

from dlmscope.interp.autointerp import PlantedExplainer, score_report
from dlmscope.interp.concepts import labelled_activations, score_concepts
from dlmscope.interp.features import feature_report
from dlmscope.interp.judges import PlantedJudge
from dlmscope.world import CONCEPTS, concept_id_table

__all__ = ["add_planted_concepts", "build_report"]


def add_planted_concepts(report: dict, adapter, sae, layer: int, token_batches: Sequence) -> None:
    """``latents[id]["concept"] = {"name", "f1"}``: the planted concept each latent detects best on clean
    ``token_batches`` (F1 of "the latent fires" vs "the token is a word of the concept")."""
    names, table = concept_id_table(adapter.tokenizer)
    acts, labels = labelled_activations(adapter, token_batches, layer, table, "clean")
    f1 = score_concepts(sae, acts, labels, names).f1_matrix                      # [n_latents, n_concepts]
    for key, entry in report["latents"].items():
        row = f1[int(key)]
        best = int(row.argmax())
        entry["concept"] = {"name": names[best], "f1": float(row[best])}


def build_report(adapter, sae, layer: int, token_batches: Sequence, *, sample: int | None = 50,
                 masked_t: float | None = 0.3, explainer=None, judge=None, planted: bool = True, seed: int = 0,
                 policy: str = "", model_name: str = "") -> dict:
    """The feature report with planted concepts (``planted``: world text) and auto-interp scores (the planted
    explainer and judge by default on world text; pass others for real models, or ``explainer=False`` to
    skip auto-interp)."""
    report = feature_report(adapter, sae, layer, token_batches, sample=sample, masked_t=masked_t, seed=seed,
                            policy=policy, model_name=model_name)
    if planted:
        add_planted_concepts(report, adapter, sae, layer, token_batches)
    if explainer is not False:
        if explainer is None and not planted:
            raise ValueError("auto-interp outside the embedded world needs an explainer and a judge "
                             "(dlmscope.interp.autointerp.HFExplainer / OpenAIExplainer with an HF / OpenAI judge)")
        score_report(report, explainer or PlantedExplainer(concepts=CONCEPTS), judge or PlantedJudge(concepts=CONCEPTS),
                     seed=seed)
    return report
