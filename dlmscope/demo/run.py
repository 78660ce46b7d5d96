"""The demo's run: harvest and train the SAEs of every (model, policy), evaluate them, write the outputs.

See :mod:`dlmscope.demo` for what the run does; training goes through :func:`dlmscope.jobs.train.train_sweep`.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dlmscope.util import atomic
from dlmscope import models
from dlmscope.interp.concepts import labelled_activations_by_layer, score_concepts
from dlmscope.interp.baselines import concept_baselines
from dlmscope.jobs.train import SweepSpec, heldout_activations, make_saes, train_sweep
from dlmscope.sae.topk import TopKSAE
from dlmscope.analysis.splice import delta_loss_by_layer
from dlmscope.sae.metrics import FVE_TOLERANCE, MAX_DEAD_FRACTION, evaluate_sae, training_failure
from dlmscope.train.log import LogConfig
from dlmscope.world import asset, concept_id_table, world_batches
from .config import RUNS, DemoConfig
from .findings import findings
from .plots import write_plots
from .report import write_report
from .orders import run_orders
from .steering import run_steering
from .transfer import run_transfer_section
from .crosscoder import run_crosscoder_section

#: the embedded world's models (dlmscope/world/assets/models/)
WORLD_MODELS = ("dlm", "ar", "ar_matched", "instruct", "placebo")

__all__ = ["WORLD_MODELS", "load_world_model", "sweep_spec", "train_layer_saes", "run_demo"]


def load_world_model(name: str):
    """The embedded world's ``dlm`` (LLaDA format), ``ar`` (Llama, the DLM's init), ``ar_matched`` (Llama, the
    budget-matched AR twin: the DLM's steps and data), ``instruct`` or ``placebo`` (the DLM fine-tuned with the
    instruct recipe on base text only) model as an adapter."""
    if name not in WORLD_MODELS:
        raise ValueError(f"unknown embedded-world model {name!r}; expected one of {', '.join(WORLD_MODELS)}")
    return models.load(asset("models", name))


def sweep_spec(cfg: DemoConfig, policy: str, layers=None) -> SweepSpec:
    """The demo's harvest-and-train settings for one policy."""
    return SweepSpec(layers=tuple(cfg.layers if layers is None else layers), ks=cfg.ks, n_latents=cfg.n_latents,
                     policy=policy, tokens=cfg.train_tokens, batch_size=cfg.sae_batch, seed=cfg.seed)


def train_layer_saes(adapter, batches: list[torch.Tensor], policy: str, cfg: DemoConfig, *, layers=None,
                     cache_dir: str | os.PathLike | None = None, label: str = "",
                     extra_seeds: tuple[int, ...] = ()) -> dict[int, list[TopKSAE]]:
    """Train the demo's k sweep on each layer (one harvest, :func:`~dlmscope.jobs.train.train_sweep`);
    returns ``{layer: [SAE per k]}``, followed by one SAE at ``cfg.k_ref`` per init seed of ``extra_seeds``
    (trained in the same grouped trainer on the same activations; only the initialisation differs, from
    :func:`~dlmscope.jobs.train.make_saes` with that seed). Several layers need ``cache_dir``."""
    spec = sweep_spec(cfg, policy, layers)
    source = {"model": str(getattr(adapter, "source", ""))}
    start = {L: make_saes(adapter.d_model, spec, L, source | {"init_seed": spec.seed})
             + [make_saes(adapter.d_model, dataclasses.replace(spec, seed=s, ks=(cfg.k_ref,)), L,
                          source | {"init_seed": s})[0] for s in extra_seeds]
             for L in spec.layers}
    return train_sweep(adapter, batches, spec, cfg.train_config(), cache_dir=cache_dir, saes=start,
                       log=LogConfig(log_every=25), label=label)


def run_demo(out_dir: str | os.PathLike = "runs/demo", cfg: DemoConfig | None = None, *,
             plots: bool = True) -> dict:
    """Run the whole demo; writes ``results.json``, ``*.png`` and ``report.md`` under ``out_dir``.

    Returns the results dict (also in ``results.json``). SAEs are saved under ``out_dir/saes``.
    """
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"config": dataclasses.asdict(cfg), "torch": torch.__version__, "threads":
                     torch.get_num_threads(), "runs": {}, "seed_runs": {}, "concept_baselines": {}, "timings_s": {}}
    names = ({m for m, _ in RUNS} | ({"instruct"} if cfg.transfer_layers else set())
             | ({"instruct", "placebo"} if cfg.crosscoder_layers else set()))
    adapters = {name: load_world_model(name) for name in sorted(names)}
    for a in adapters.values():
        a.check_layers(cfg.layers)
    results["num_layers"] = adapters["dlm"].num_layers
    results["d_model"] = adapters["dlm"].d_model
    results["n_params"] = sum(p.numel() for p in adapters["dlm"].model.parameters())
    tokenizer = adapters["dlm"].tokenizer
    train_batches, held_batches = world_batches(tokenizer, cfg.sentences, cfg.seq_len, cfg.lm_batch, cfg.seed)
    names, table = concept_id_table(tokenizer)
    delta_batches = held_batches[: cfg.delta_max_batches]
    concept_rows = held_batches[: cfg.concept_batches]
    steer_saes, steer_latents = {}, {}   # (model, layer) -> the k_ref SAE and each concept's best latent
    order_saes = {}                      # layer -> the Mask-SAE at k_ref that replays the decoding orders
    results["corpus"] = {"train_tokens": sum(b.numel() for b in train_batches),
                         "heldout_tokens": sum(b.numel() for b in held_batches)}

    extra_seeds = cfg.init_seeds[1:]
    results["sae_seeds"] = {
        "k": cfg.k_ref, "init_seeds": list(cfg.init_seeds), "k_sweep_seed": cfg.seed,
        "runs": [f"{m}/{p}" for m, p in RUNS], "layers": list(cfg.layers),
        "grid": f"every run and layer at k = {cfg.k_ref}; the other k with init seed {cfg.seed} only",
        "shared": "the harvest, data order and corruption; only the SAE initialisation differs between seeds",
        "interval": "min–max over the seeds that did not fail (with 3 seeds a bootstrap interval says no more)",
        "failed_rule": f"more than {MAX_DEAD_FRACTION:.0%} of latents dead on held-out tokens, or FVE more than "
                       f"{FVE_TOLERANCE} below that of a smaller k of the same run and layer (for the extra seeds: "
                       f"of the k sweep's); failed SAEs are kept out of every mean"}
    for model_name, policy in RUNS:
        adapter = adapters[model_name]
        run_key = f"{model_name}/{policy}"
        t0 = time.perf_counter()
        cache = out / "cache" / f"{model_name}_{policy}"
        shutil.rmtree(cache, ignore_errors=True)  # the demo's cache is scratch: always harvest afresh
        trained = train_layer_saes(adapter, train_batches, policy, cfg, cache_dir=cache, label=run_key,
                                   extra_seeds=extra_seeds)
        shutil.rmtree(out / "cache", ignore_errors=True)
        t_train = time.perf_counter() - t0
        # held-out activations of every layer from one pass (the same tokens for every SAE of a layer)
        held = heldout_activations(adapter, held_batches, sweep_spec(cfg, policy),
                                   tokens=cfg.eval_tokens)
        # view -> (choose-on, score-on) halves of the text -> {layer: (acts, labels)}, every layer from one forward
        halves = (concept_rows[0::2], concept_rows[1::2])
        labelled = {"concepts_clean": [labelled_activations_by_layer(adapter, rows, cfg.layers, table, "clean")
                                       for rows in halves]}
        if policy != "clean":
            labelled["concepts_masked"] = [
                labelled_activations_by_layer(adapter, rows, cfg.layers, table, "masked", t=cfg.concept_t,
                                              seed=cfg.seed + i) for i, rows in enumerate(halves)]
        # ΔLM of every layer's SAEs (the sweep's, then the extra seeds'), one clean forward per batch for all
        deltas_by_layer = delta_loss_by_layer(adapter, {L: trained[L] for L in cfg.layers}, delta_batches,
                                              seed=cfg.seed + 7, target_rel_se=cfg.delta_rel_se,
                                              round_batches=cfg.delta_batches)
        run: dict = {}
        for layer in tqdm(cfg.layers, desc=f"evaluate {run_key}", unit="layer"):
            sweep, extras = trained[layer][:len(cfg.ks)], trained[layer][len(cfg.ks):]
            views = {view: (choose[layer], score[layer]) for view, (choose, score) in labelled.items()}
            deltas = deltas_by_layer[layer]
            entries = []
            for sae, delta in zip(sweep + extras, deltas):
                entry = evaluate_sae(sae, held[layer])
                entry["delta"] = delta
                for view, (choose, score) in views.items():
                    entry[view] = score_concepts(sae, *score, names, select_on=choose).as_dict()
                entries.append(entry)
            fves = {}
            for sae, entry in zip(sweep, entries):
                entry["failed"] = training_failure(entry["fve"], entry["dead_fraction"],
                                                    [f for k, f in fves.items() if k < sae.k])
                fves[sae.k] = entry["fve"]
                sae.save(out / "saes" / f"{model_name}_{policy}" / f"layer_{layer}" / f"k_{sae.k}")
                run.setdefault(str(layer), {})[str(sae.k)] = entry
            for seed, sae, entry in zip(extra_seeds, extras, entries[len(sweep):]):
                entry["failed"] = training_failure(entry["fve"], entry["dead_fraction"],
                                                    [f for k, f in fves.items() if k < sae.k])
                entry["init_seed"] = seed
                sae.save(out / "saes" / f"{model_name}_{policy}" / f"layer_{layer}" / f"k_{sae.k}_seed_{seed}")
                results["seed_runs"].setdefault(run_key, {}).setdefault(str(layer), {})[str(seed)] = entry
            ref = next(s for s in sweep if s.k == cfg.k_ref)
            # controls of the concept F1, on the same tokens and choice: untrained SAEs with the reference SAE's
            # b_dec and row norms, and the best single residual dimension
            results["concept_baselines"].setdefault(run_key, {})[str(layer)] = {
                view: concept_baselines(ref, *score, names, count=5, seed=cfg.seed, select_on=choose)
                for view, (choose, score) in views.items()}
            if policy == "mask" and layer in cfg.order_layers:
                order_saes[layer] = ref
            if policy in ("unmask", "clean") and layer in cfg.steer_layers:
                steer_saes[(model_name, layer)] = ref
                chosen = run[str(layer)][str(cfg.k_ref)]["concepts_clean"]["concepts"]
                steer_latents[(model_name, layer)] = {c: v["latent"] for c, v in chosen.items()}
        results["runs"][run_key] = run
        results["timings_s"][run_key] = {"harvest_and_train": t_train, "total": time.perf_counter() - t0}
    if cfg.steer_layers:
        t0 = time.perf_counter()
        results["steering"] = run_steering(adapters, steer_saes, steer_latents, cfg)
        results["timings_s"]["steering"] = time.perf_counter() - t0
    if cfg.order_layers:
        t0 = time.perf_counter()
        results["orders"] = run_orders(adapters["dlm"], order_saes, cfg)
        results["timings_s"]["orders"] = time.perf_counter() - t0
    if cfg.transfer_layers:
        t0 = time.perf_counter()
        results["transfer"] = run_transfer_section(adapters, (train_batches, held_batches), cfg)
        results["timings_s"]["transfer"] = time.perf_counter() - t0
    if cfg.crosscoder_layers:
        t0 = time.perf_counter()
        results["crosscoder"] = run_crosscoder_section(adapters, (train_batches, held_batches), cfg)
        results["timings_s"]["crosscoder"] = time.perf_counter() - t0
    results["findings"] = findings(results, cfg)
    results["timings_s"]["total"] = time.perf_counter() - started
    atomic.write_json(out / "results.json", results)
    if plots:
        write_plots(results, cfg, out)
    write_report(results, cfg, out, plots=plots)
    return results
