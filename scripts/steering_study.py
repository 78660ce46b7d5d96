"""Steering on the embedded world: every planted concept's best latent, DLM vs AR twin, α sweep, scopes and
schedules. Writes docs/steering.json (docs/steering.md quotes it). Fluency is the perplexity of the
generations under the unsteered AR twin, for both models.

    python scripts/steering_study.py [--out docs/steering.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import torch

from dlmscope import atomic
from dlmscope.demo import DemoConfig, load_world_model, train_layer_saes, world_batches
from dlmscope.judges import PlantedJudge
from dlmscope.sampling import ar_generate, llada_generate
from dlmscope.steer_run import concept_features, neutral_prompts
from dlmscope.steering import steering_score
from dlmscope.world import CONCEPTS

LAYERS = (1, 4, 6)
ALPHAS = (1.0, 2.0, 3.0, 4.0, 6.0)
GEN = 4
#: generations kept per run in the JSON (the means use all of them)
KEEP = 8


def _record(r) -> dict:
    d = dataclasses.asdict(r)
    d["generations_before"], d["generations_after"] = d["generations_before"][:KEEP], d["generations_after"][:KEEP]
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="docs/steering.json")
    p.add_argument("--prompts", type=int, default=40)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = dataclasses.replace(DemoConfig(), ks=(8,), k_ref=8, train_tokens=100_000, sentences=30_000)
    dlm, ar = load_world_model("dlm"), load_world_model("ar")
    judge = PlantedJudge()
    prompts = neutral_prompts(dlm.tokenizer, a.prompts)
    gens = {"dlm": functools.partial(llada_generate, gen_length=GEN, steps=GEN, temperature=0.7),
            "ar": functools.partial(ar_generate, max_new_tokens=GEN, temperature=0.7)}
    out = {"layers": LAYERS, "alphas": ALPHAS, "gen_length": GEN, "n_prompts": len(prompts), "runs": {}}
    for name, model, policy in (("dlm", dlm, "unmask"), ("ar", ar, "clean")):
        train, _ = world_batches(model.tokenizer, cfg)
        saes = train_layer_saes(model, train, policy, cfg, layers=list(LAYERS), cache_dir=f"/tmp/steer-study-{name}")
        for L in LAYERS:
            sae = saes[L][0]
            feats = concept_features(model, sae, L, list(CONCEPTS))
            for concept, f in feats.items():
                for alpha in ALPHAS:
                    r = steering_score(model, prompts, gens[name], GEN, L, sae, f, alpha, concept, judge, ar, seed=0)
                    out["runs"][f"{name}/{L}/{concept}/{alpha}"] = _record(r) | {"feature": f}
            if name == "dlm" and L == 4:
                for scope in ("generation", "masked"):
                    for schedule in ("all", ("first", 0.25), ("last", 0.5)):
                        for concept, f in feats.items():
                            r = steering_score(model, prompts, gens[name], GEN, L, sae, f, 4.0, concept, judge, ar,
                                               seed=0, scope=scope, schedule=schedule)
                            out["runs"][f"dlm/4/{concept}/4.0/{scope}/{schedule}"] = _record(r)
            print(f"{name} L{L} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    out["wall_s"] = time.perf_counter() - t0
    atomic.write_json(a.out, out)
    print(f"wrote {a.out} in {out['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
