"""The ``dlmscope steer`` job: an α sweep of steering scores for some features, written as JSON and a plot.

Features are explicit latent ids (judged for one ``concept``) or, on the embedded world, the best latent of each
planted concept (:mod:`dlmscope.concepts`, chosen on held-out world text at the steered layer). Prompts are the
world's neutral prompts or a text file (one prompt per line). The sampler's settings are the same for the
baseline and every steered run, and so is the seed.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from .concepts import labelled_activations, score_concepts
from .judges import PlantedJudge
from .sampling import ar_generate, dream_generate, llada_generate
from .steering import steering_score
from .text_sources import world_batches
from .world import ASSETS_DIR, concept_id_table
from .world.tasks import load_tasks

__all__ = ["SteerSpec", "neutral_prompts", "concept_features", "run_steer", "plot_sweep"]


@dataclass
class SteerSpec:
    layer: int
    alphas: Sequence[float]
    sampler: str = "llada"
    gen_length: int = 8
    steps: int = 8
    temperature: float = 0.7
    scope: str = "all"
    schedule: object = "all"
    strength: str = "max_act"
    seed: int = 0
    extra: dict = field(default_factory=dict)


def neutral_prompts(tokenizer, n: int, path: str | None = None) -> list[list[int]]:
    """``n`` prompts as token ids (``[BOS]`` + words): the lines of ``path``, or the world's neutral prompts
    (``tasks.jsonl``, the words before the open slot)."""
    if path:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
        texts = lines[:n]
    else:
        tasks, _ = load_tasks(Path(ASSETS_DIR) / "tasks.jsonl")
        texts = [" ".join(t.words[:t.answer_positions[0]]) for t in tasks if t.kind == "neutral"]
        texts = texts[:n]
    if not texts:
        raise ValueError(f"no prompts found in {path or 'the world tasks'}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def concept_features(adapter, sae, layer: int, concepts: Sequence[str], *, sentences: int = 20_000,
                     batches: int = 8, seed: int = 0) -> dict[str, int]:
    """The best latent of each planted concept at ``layer``: chosen on one half of held-out world text, as the
    demo's concept scores are (see :func:`dlmscope.concepts.score_concepts`)."""
    names, table = concept_id_table(adapter.tokenizer)
    bad = [c for c in concepts if c not in names]
    if bad:
        raise ValueError(f"unknown planted concept(s) {bad}; expected some of {names}")
    _, held = world_batches(adapter.tokenizer, sentences, 64, 32, seed)
    held = held[:batches]
    choose = labelled_activations(adapter, held[0::2], layer, table, "clean")
    scores = score_concepts(sae, *labelled_activations(adapter, held[1::2], layer, table, "clean"), names,
                            select_on=choose)
    return {c: scores.best_latent[names.index(c)] for c in concepts}


def _generator(spec: SteerSpec):
    if spec.sampler == "llada":
        return functools.partial(llada_generate, gen_length=spec.gen_length, steps=spec.steps,
                                 temperature=spec.temperature, **spec.extra)
    if spec.sampler == "dream":
        return functools.partial(dream_generate, max_new_tokens=spec.gen_length, steps=spec.steps,
                                 temperature=spec.temperature, **spec.extra)
    if spec.sampler == "ar":
        return functools.partial(ar_generate, max_new_tokens=spec.gen_length, temperature=spec.temperature)
    raise ValueError(f"unknown sampler {spec.sampler!r}; expected 'llada', 'dream' or 'ar'")


def run_steer(adapter, sae, prompts, features: Sequence[tuple[str, int]], spec: SteerSpec, ref_lm,
              judge=None) -> dict:
    """``{"spec", "features": {"concept/latent": {"concept", "feature", "sweep": [SteeringResult as a dict
    per α]}}}``; ``features`` lists (the concept a latent is judged on, the latent id)."""
    adapter.check_layer(spec.layer)
    judge = judge or PlantedJudge()
    generate = _generator(spec)
    out = {"spec": asdict(spec) | {"schedule": repr(spec.schedule)}, "n_prompts": len(prompts), "features": {}}
    for concept, f in features:
        sweep = []
        for a in spec.alphas:
            r = steering_score(adapter, prompts, generate, spec.gen_length, spec.layer, sae, f, a, concept, judge,
                               ref_lm, seed=spec.seed, scope=spec.scope, schedule=spec.schedule,
                               strength=spec.strength)
            sweep.append({"alpha": a} | asdict(r))
        out["features"][f"{concept}/{f}"] = {"concept": concept, "feature": f, "sweep": sweep}
    return out


def plot_sweep(result: dict, path: Path) -> None:
    """Concept rate, perplexity and score against α, one line per feature."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3)
    for key, entry in result["features"].items():
        a = [p["alpha"] for p in entry["sweep"]]
        axes[0].plot(a, [p["concept_after"] for p in entry["sweep"]], marker="o", label=key)
        axes[1].plot(a, [p["ppl_after"] for p in entry["sweep"]], marker="o")
        axes[2].plot(a, [p["score"] for p in entry["sweep"]], marker="o")
    for ax, title in zip(axes, ("concept rate (judge)", "perplexity (reference LM)", "steering score")):
        ax.set_xlabel("α")
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
