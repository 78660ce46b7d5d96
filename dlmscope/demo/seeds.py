"""The demo's SAE seeds at ``k_ref``: FVE, the FVE gaps the findings state and the concept-F1 margins, each as a
mean over init seeds with its min–max range.

Every run and layer has ``cfg.sae_seeds`` SAEs at ``k_ref`` (``results["runs"]`` holds the k sweep's, init seed
``cfg.seed``; ``results["seed_runs"][run][layer][seed]`` the others, see :mod:`dlmscope.demo.run`). A failed SAE
(``entry["failed"]``, :func:`dlmscope.sae.metrics.training_failure`) is listed and kept out of every mean. The range
is min–max over the seeds that did not fail: with three seeds a bootstrap percentile interval is about as wide and
claims more than three draws support; the interval is over init seeds only (the data order is shared).
"""
from __future__ import annotations

import statistics

from dlmscope.util.bootstrap import spread

__all__ = ["seed_entries", "seed_summary", "GAPS"]

#: the FVE gaps the findings use, ``(name, run minus, run subtracted)``
GAPS = (("mask_minus_unmask", "dlm/mask", "dlm/unmask"), ("unmask_minus_ar", "dlm/unmask", "ar/clean"),
        ("mask_minus_ar", "dlm/mask", "ar/clean"), ("unmask_minus_ar_matched", "dlm/unmask", "ar_matched/clean"),
        ("mask_minus_ar_matched", "dlm/mask", "ar_matched/clean"))


def seed_entries(results: dict, run_key: str, layer, k_ref: int) -> dict[int, dict]:
    """``{init seed: entry}`` at ``(run_key, layer, k_ref)``: the k sweep's SAE, then the extra seeds'."""
    first = results.get("sae_seeds", {}).get("k_sweep_seed", results["config"]["seed"])
    out = {int(first): results["runs"][run_key][str(layer)][str(k_ref)]}
    for seed, entry in results.get("seed_runs", {}).get(run_key, {}).get(str(layer), {}).items():
        out[int(seed)] = entry
    return out


def _value(entry: dict, key: str):
    """``entry[key]`` unless the SAE failed (None: kept out)."""
    return None if entry.get("failed") else entry[key]


def seed_summary(results: dict, layers, k_ref: int) -> dict:
    """FVE per (run, layer) over seeds; each gap of :data:`GAPS` per seed (mean over the layers where neither
    SAE of that seed failed) and per layer, each with :func:`spread`; the failed SAEs."""
    runs = [key for key in results["runs"]]
    seeds = sorted(seed_entries(results, runs[0], layers[0], k_ref))
    entries = {(key, L): seed_entries(results, key, L, k_ref) for key in runs for L in layers}
    out: dict = {"k": k_ref, "init_seeds": seeds, "fve": {}, "gaps": {}, "failed": [], "over": "init seeds",
                 "interval": "min–max over the seeds that did not fail"}
    for (key, L), by_seed in entries.items():
        out["fve"].setdefault(key, {})[str(L)] = spread(_value(by_seed.get(s, {"failed": "missing"}), "fve")
                                                        for s in seeds)
        out["failed"] += [[key, L, k_ref, s, e["failed"]] for s, e in by_seed.items() if e.get("failed")]
    for name, a, b in GAPS:
        if a not in runs or b not in runs:
            continue
        per_layer, per_seed = {}, []
        for s in seeds:
            gaps = []
            for L in layers:
                ea, eb = entries[(a, L)].get(s, {"failed": "missing"}), entries[(b, L)].get(s, {"failed": "missing"})
                gaps.append(None if ea.get("failed") or eb.get("failed") else ea["fve"] - eb["fve"])
            ok = [g for g in gaps if g is not None]
            per_seed.append({"seed": s, "mean_gap": statistics.fmean(ok) if ok else None, "layers_used": len(ok)})
            for L, g in zip(layers, gaps):
                per_layer.setdefault(str(L), []).append(g)
        out["gaps"][name] = {"mean_over_layers": spread(p["mean_gap"] for p in per_seed), "per_seed": per_seed,
                             "per_layer": {L: spread(v) for L, v in per_layer.items()}}
    return out
