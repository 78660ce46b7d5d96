"""The crosscoder model diff: which latents a fine-tune created or removed, each claim read against two nulls.

Per layer, :func:`run_crosscoder_diff` trains ``seeds`` two-source crosscoders
(:class:`~dlmscope.sae.crosscoder.Crosscoder`, source 0 = the base model, source 1 = the target, e.g. the instruct
twin) on paired activations: one forward of each model on the same corrupted tokens
(:func:`~dlmscope.analysis.transfer.paired_activations`), the pre-training text interleaved 1:1 with the fine-tune's
own text when given (the instruct twin's own SFT mix). Each source is divided by its own centred scale
(:func:`~dlmscope.train.normalization.norm_factor`), so both carry a total variance of 1 in the loss. The seeds share
the data order and differ in their initialisation only. Then, on held-out paired tokens:

* a latent is *alive* when it fires on >= ``min_fires`` held-out tokens; its relative decoder norm ρ (0 = base
  only, 1 = target only) labels it exclusive to the base (ρ <= ``low``: the fine-tune removed it), to the target
  (ρ >= ``high``: created) or shared;
* an exclusive latent is *robust* when Latent Scaling does not flag it (its direction is not still present in the
  other model's activations, :func:`~dlmscope.analysis.crosscoder.latent_scaling`, ν <= ``max_nu``);
* null 1, **seed to seed**: for every ordered pair of seeds, do the robust exclusive latents of one come back, with
  the same label, in the other, more often than labels drawn at random would give
  (:func:`~dlmscope.analysis.crosscoder.exclusive_replication`)?
* null 2, **placebo** (with ``placebo``, e.g. the world's placebo twin: the base fine-tuned with the same recipe on
  base text only): the same crosscoders between the base and the placebo; their robust exclusive latents are what
  fine-tuning itself, with nothing new to learn, produces;
* **what the fine-tune taught** (with the fine-tune's own text): per seed, the mean log firing-rate ratio own text
  / pre-training text (:func:`~dlmscope.analysis.crosscoder.specificity`) of the robust exclusive latents minus that
  of the alive shared latents, an interval over latents; and, threshold-free, the correlation over alive latents of
  ρ with that ratio (do latents that lean to one model fire more on the fine-tune's text?), beside the placebo's.

The pre-specified verdict per side (created / removed): *shown* when every ordered seed pair replicates
(one-sided p < ``ALPHA``), every seed's robust count exceeds every placebo seed's (with a placebo) and the
specificity difference is above 0 for every seed (with own text). Otherwise the words say which test failed.
Never "reproduced": there is no published number to reproduce.

    result = run_crosscoder_diff(load_world_model("dlm"), load_world_model("instruct"), [5, 7], policy="mask",
                                 placebo=load_world_model("placebo"),
                                 own_batches=(world_qa_batches(tok, seed=1), world_qa_batches(tok, seed=0)))
    print("\\n".join(crosscoder_lines(result)))
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from dlmscope.analysis.crosscoder import (EXCLUSIVE_0, EXCLUSIVE_1, SHARED, exclusive_replication, firing_counts,
                                          latent_labels, latent_scaling, relative_decoder_norm, specificity)
from dlmscope.analysis.transfer import check_models, paired_activations
from dlmscope.data.activations import check_policy
from dlmscope.sae.crosscoder import Crosscoder
from dlmscope.train.crosscoder import fit_crosscoder
from dlmscope.train.normalization import norm_factor
from dlmscope.util.bootstrap import correlation, spread, two_sample_difference
from dlmscope.util.checks import require_int
from dlmscope.world import SAE_K, SAE_LATENTS, SAE_TRAIN, world_batches

__all__ = ["SIDES", "INIT_STRIDE", "ALPHA", "diff_layer", "run_crosscoder_diff", "crosscoder_lines"]

#: the two claims: latents exclusive to the target (the fine-tune created them) / to the base (it removed them)
SIDES = {"created": (1, EXCLUSIVE_1), "removed": (0, EXCLUSIVE_0)}
#: seed replicate r's crosscoder starts from generator seed ``(seed + INIT_STRIDE · r) · 1009 + layer``
INIT_STRIDE = 10
#: the one-sided level of the seed-to-seed replication test
ALPHA = 0.05


def _interleave(a: Sequence, b: Sequence | None) -> list:
    """a[0], b[0], a[1], b[1], ... (then the rest of the longer one); ``a`` when ``b`` is None."""
    if b is None:
        return list(a)
    return [x for pair in itertools.zip_longest(a, b) for x in pair if x is not None]


def _check_counts(**counts) -> None:
    """Every count an int >= 1 and ``seeds`` >= 2 (the seed-to-seed null needs a pair): one ValueError naming it."""
    for name, value in counts.items():
        require_int(name, value, 1)
    if counts["seeds"] < 2:
        raise ValueError("seeds must be >= 2: the seed-to-seed null needs a pair of seeds")


def _stream(x: Tensor, batch: int, seed: int) -> Iterator[Tensor]:
    """Endless [batch, 2, d] batches of x [N, 2, d], reshuffled every epoch (``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0] - batch + 1, batch):
            yield x[perm[i:i + batch]]


def _fve(cc: Crosscoder, x: Tensor, batch: int = 4096) -> list[float]:
    """Per source, 1 − Σ‖x − x̂‖² / Σ‖x − mean x‖² over x [N, 2, d] (eval mode)."""
    err = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for xb in x.split(batch):
            err += (xb - cc(xb)).double().pow(2).sum((0, 2))
    total = (x.double() - x.double().mean(0)).pow(2).sum((0, 2))
    return (1 - err / total).tolist()


def _analyse(cc: Crosscoder, held: Tensor, own: Tensor | None, *, min_fires: int, low: float, high: float,
             max_nu: float, resamples: int, seed: int) -> tuple[dict, dict]:
    """(the JSON-able analysis of one trained crosscoder on held-out paired tokens, its tensors for the
    replication test: ``alive`` [n] bool and ``robust[side]`` [n] bool)."""
    cc.eval()
    both = lambda: itertools.chain(held.split(4096), () if own is None else own.split(4096))  # noqa: E731
    c_text, t_text = firing_counts(cc, held.split(4096))
    c_own, t_own = firing_counts(cc, own.split(4096)) if own is not None else (0, 0)
    counts, tokens = c_text + c_own, t_text + t_own
    alive = counts >= min_fires
    rho = relative_decoder_norm(cc)
    labels = latent_labels(rho, low, high)
    out: dict = {"fve": {"text": _fve(cc, held)}, "alive": int(alive.sum()), "held_tokens": tokens,
                 "counts": {name: int(((labels == code) & alive).sum()) for name, code in
                            (("shared", SHARED), ("base_only", EXCLUSIVE_0), ("target_only", EXCLUSIVE_1))},
                 "rho_alive": [round(float(r), 4) for r in rho[alive]],
                 "rho_sd": float(rho[alive].double().std()) if int(alive.sum()) > 1 else math.nan, "sides": {}}
    if own is not None:
        out["fve"]["own"] = _fve(cc, own)
        spec = specificity(c_own, t_own, c_text, t_text)
        # the threshold-free reading: do latents that lean to the target fire more on the fine-tune's own text?
        iv = correlation(rho[alive], spec[alive], resamples=resamples, seed=seed)
        out["lean_specificity_corr"] = {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}
    robust: dict[str, Tensor] = {}
    for side, (source, code) in SIDES.items():
        candidates = (labels == code) & alive
        ids = candidates.nonzero().squeeze(1)
        keep = torch.zeros_like(candidates)
        entry: dict = {"exclusive": int(ids.numel())}
        if ids.numel():
            scaling = latent_scaling(cc, both(), ids, source=source)
            keep[ids[~scaling.flagged(max_nu)]] = True
            entry.update(nu_error=[round(float(v), 4) for v in scaling.nu_error],
                         nu_recon=[round(float(v), 4) for v in scaling.nu_recon])
        robust[side] = keep
        entry.update(robust=int(keep.sum()), latents=keep.nonzero().squeeze(1).tolist())
        if own is not None:
            shared = (labels == SHARED) & alive
            iv = two_sample_difference(spec[keep], spec[shared], resamples=resamples, seed=seed, unit="latents")
            entry["specificity"] = {"exclusive_mean": float(spec[keep].mean()) if keep.any() else math.nan,
                                    "shared_mean": float(spec[shared].mean()) if shared.any() else math.nan,
                                    "minus_shared": {"mean": iv.mean, "low": iv.low, "high": iv.high,
                                                     "over": dict(iv.over)}}
        out["sides"][side] = entry
    return out, {"alive": alive, "robust": robust}


def _lean_outcome(runs: list[dict]) -> str | None:
    """``"target_lean_fires_on_own_text"`` when every seed's ρ-specificity correlation is above 0,
    ``"base_lean_fires_on_own_text"`` when every one is below, else ``"none"``; None without own text."""
    ivs = [r.get("lean_specificity_corr") for r in runs]
    if not ivs or ivs[0] is None:
        return None
    if all(iv["low"] > 0 for iv in ivs):
        return "target_lean_fires_on_own_text"
    return "base_lean_fires_on_own_text" if all(iv["high"] < 0 for iv in ivs) else "none"


def _side_verdict(side: str, runs: list[dict], placebo: list[dict] | None, replication: list[dict]) -> dict:
    """The pre-specified verdict of one side (see the module doc) from the per-seed analyses."""
    counts = [r["sides"][side]["robust"] for r in runs]
    checks = {"replicates": bool(replication) and all(p["p_value"] < ALPHA for p in replication)}
    null_counts = None
    if placebo is not None:
        null_counts = [z["sides"][side]["robust"] for z in placebo]
        checks["above_placebo"] = min(counts) > max(null_counts)
    own = "specificity" in runs[0]["sides"][side]
    if own:
        lows = [r["sides"][side]["specificity"]["minus_shared"]["low"] for r in runs]
        checks["own_text_specific"] = all(v > 0 for v in lows)  # NaN (no robust latent) compares False
    shown = all(checks.values())
    failed = [name for name, ok in checks.items() if not ok]
    what = {"created": "latents exclusive to the target model", "removed": "latents exclusive to the base model"}[side]
    against = f", placebo {min(null_counts)}–{max(null_counts)}" if null_counts is not None else ", no placebo null"
    if shown:
        words = (f"shown: {what}, {min(counts)}–{max(counts)} per seed{against}, replicated across seeds"
                 + (", firing more on the fine-tune's own text than shared latents" if own else ""))
    else:
        words = f"not shown ({', '.join(failed)} failed): {what} {min(counts)}–{max(counts)} per seed{against}"
    return {"counts": spread(counts), "placebo_counts": None if null_counts is None else spread(null_counts),
            "checks": checks, "outcome": "shown" if shown else "not_shown", "words": words}


def _train_seeds(x: Tensor, held: Tensor, own: Tensor | None, *, n_latents: int, k: int, rule: str, steps: int,
                 seeds: int, seed: int, layer: int, batch_size: int, lr: float, warmup_steps: int, dead_tokens: int,
                 meta: dict, save_dir: Path | None, analyse: dict) -> tuple[list[dict], list[tuple]]:
    """``seeds`` crosscoders on the scaled paired stream x (one data order ``seed``), each analysed on held / own:
    (the analyses, [(crosscoder, its tensors)])."""
    runs, kept = [], []
    for r in range(seeds):
        init_seed = seed + INIT_STRIDE * r
        cc = Crosscoder(2, x.shape[2], n_latents, k, rule=rule,
                        generator=torch.Generator().manual_seed(init_seed * 1009 + layer),
                        meta={**meta, "init_seed": init_seed})
        history = fit_crosscoder(cc, _stream(x, batch_size, seed), steps=steps, lr=lr, warmup_steps=warmup_steps,
                                 dead_tokens=dead_tokens, seed=init_seed)
        analysis, tensors = _analyse(cc, held, own, **analyse)
        analysis.update(init_seed=init_seed, final_loss=history[-1]["loss"], dead=history[-1]["dead"])
        runs.append(analysis)
        kept.append((cc, tensors))
        if save_dir is not None:
            cc.save(save_dir / f"seed_{r}")
    return runs, kept


def _scaled(train_x: Tensor, *others: Tensor | None) -> tuple[list[float], list[Tensor | None]]:
    """Per-source centred scales of train_x [N, 2, d], and train_x and ``others`` divided by them."""
    scales = [norm_factor([train_x[:, s]]) for s in range(2)]
    scale = torch.tensor(scales, dtype=train_x.dtype)[None, :, None]
    return scales, [None if t is None else t / scale for t in (train_x, *others)]


def diff_layer(train_x: Tensor, held_x: Tensor, own_x: Tensor | None, *, placebo: tuple | None = None,
               n_latents: int, k: int, rule: str = "batchtopk", epochs: int = 2, seeds: int = 3, seed: int = 0,
               layer: int = 0, batch_size: int = 1024, lr: float = SAE_TRAIN["lr"],
               warmup_steps: int = SAE_TRAIN["warmup_steps"], dead_tokens: int = SAE_TRAIN["dead_tokens"],
               min_fires: int = 20, low: float = 0.1, high: float = 0.9, max_nu: float = 0.3, resamples: int = 2000,
               meta: dict | None = None, save_dir: str | Path | None = None) -> dict:
    """The diff at one hook point from paired activations ``[N, 2, d]`` (source 0 the base, 1 the target):
    ``train_x`` trains, ``held_x`` (pre-training text) and ``own_x`` (the fine-tune's own text, or None) score.
    ``placebo``: optionally ``(train_x, held_x, own_x)`` of the base paired with the placebo model, the same
    tokens' kind, trained and scored the same way (the count null). Each pair of sources is divided by its own
    centred scales on its ``train_x``; ``seeds`` crosscoders (init generator ``(seed + INIT_STRIDE · r) · 1009 +
    layer``) train for ``epochs`` passes over one data order (``seed``). Returns ``{"scales", "runs",
    "replication", "verdict"}`` (+ ``"placebo"``: its scales and runs; module doc); ``save_dir``: the target's
    crosscoders saved to ``save_dir/seed_<r>``."""
    _check_counts(seeds=seeds, epochs=epochs, batch_size=batch_size, min_fires=min_fires)
    d = train_x.shape[-1]
    for name, x in (("train_x", train_x), ("held_x", held_x), ("own_x", own_x)) + tuple(
            (f"placebo[{i}]", t) for i, t in enumerate(placebo or ())):
        if x is not None and (x.dim() != 3 or x.shape[1] != 2 or x.shape[2] != d):
            raise ValueError(f"{name} must be [N, 2, d] paired activations (d={d}), got {list(x.shape)}")
    if placebo is not None and (len(placebo) != 3 or (placebo[2] is None) != (own_x is None)):
        raise ValueError("placebo must be (train_x, held_x, own_x) with own_x given exactly when own_x is")
    steps = epochs * (train_x.shape[0] // batch_size)
    if steps < 1:
        raise ValueError(f"{train_x.shape[0]} paired training tokens are fewer than one batch of {batch_size}")
    kw = dict(n_latents=n_latents, k=k, rule=rule, steps=steps, seeds=seeds, seed=seed, layer=layer,
              batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, dead_tokens=dead_tokens,
              analyse=dict(min_fires=min_fires, low=low, high=high, max_nu=max_nu, resamples=resamples, seed=seed))
    scales, (x, held, own) = _scaled(train_x, held_x, own_x)
    runs, kept = _train_seeds(x, held, own, meta={**(meta or {}), "source_scale": scales},
                              save_dir=None if save_dir is None else Path(save_dir), **kw)
    replication: dict[str, list] = {side: [] for side in SIDES}
    for (a, (cc_a, t_a)), (b, (cc_b, t_b)) in itertools.permutations(enumerate(kept), 2):
        for side, (source, _) in SIDES.items():
            rep = exclusive_replication(cc_a, t_a["robust"][side], cc_b, t_b["robust"][side], t_b["alive"], source)
            replication[side].append({"from": a, "to": b, **rep})
    out = {"scales": scales, "runs": runs, "replication": replication}
    null_runs = None
    if placebo is not None:
        p_scales, p_tensors = _scaled(*placebo)
        null_runs, _ = _train_seeds(*p_tensors, meta={**(meta or {}), "source_scale": p_scales, "placebo": True},
                                    save_dir=None, **kw)
        out["placebo"] = {"scales": p_scales, "runs": null_runs}
    out["verdict"] = {side: _side_verdict(side, runs, null_runs, replication[side]) for side in SIDES}
    out["lean"] = {"target": _lean_outcome(runs), "placebo": None if null_runs is None else _lean_outcome(null_runs)}
    return out


def run_crosscoder_diff(base, target, layers: Sequence[int], *, placebo=None, policy: str = "unmask",
                        n_latents: int = SAE_LATENTS, k: int = SAE_K, rule: str = "batchtopk",
                        train_tokens: int = 120_000, eval_tokens: int = 10_000, epochs: int = 2, seeds: int = 3,
                        seed: int = 0, batches: tuple[Sequence, Sequence] | None = None,
                        own_batches: tuple[Sequence, Sequence] | None = None, sentences: int = 100_000,
                        seq_len: int = 64, lm_batch: int = 32, batch_size: int = 1024,
                        lr: float = SAE_TRAIN["lr"], warmup_steps: int = SAE_TRAIN["warmup_steps"],
                        dead_tokens: int = SAE_TRAIN["dead_tokens"], min_fires: int = 20, low: float = 0.1,
                        high: float = 0.9, max_nu: float = 0.3, resamples: int = 2000,
                        save_dir: str | Path | None = None) -> dict:
    """The crosscoder diff of ``base`` (source 0) and ``target`` (source 1) at ``layers``; a JSON-able dict.

    ``batches``: ``(train, heldout)`` LM batches of pre-training text (default: the embedded world's corpus);
    ``own_batches``: optional ``(train, heldout)`` LM batches of the fine-tune's own text, interleaved 1:1 with the
    pre-training text for training and held out separately for the specificity check. ``train_tokens`` paired
    tokens (corruption seed ``seed``) train ``seeds`` crosscoders per layer (``n_latents``, ``k``, ``rule``) for
    ``epochs`` passes; ``eval_tokens`` held-out paired tokens per text (corruption seed ``seed + 1``) score them.
    ``placebo``: optionally a third model (an adapter of the base fine-tuned on nothing new): the same crosscoders
    between the base and it, on the same text and corruptions, are the count null. ``save_dir``: the target's
    crosscoders (not the placebo's) are saved to ``save_dir/layer_<L>/seed_<r>``. See the module doc for the
    analysis and the verdict.
    """
    policy = check_policy(policy)
    check_models(base, target, policy)
    layers = target.check_layers(base.check_layers(layers))
    if placebo is not None:
        check_models(base, placebo, policy)
        placebo.check_layers(layers)
    _check_counts(seeds=seeds, epochs=epochs, train_tokens=train_tokens, eval_tokens=eval_tokens,
                  batch_size=batch_size, min_fires=min_fires)
    if batches is None:
        if base.tokenizer is None:
            raise ValueError("the base model has no tokenizer; pass batches=(train, heldout) token batches")
        batches = world_batches(base.tokenizer, sentences, seq_len, lm_batch, seed)
    train_b, held_b = (list(b) for b in batches)
    own_train, own_held = (None, None) if own_batches is None else (list(b) for b in own_batches)
    if not held_b or (own_batches is not None and not (own_train and own_held)):
        raise ValueError("run_crosscoder_diff needs non-empty held-out batches (and own_batches' train and heldout)")

    def harvest(other) -> tuple[dict, dict, dict | None]:
        """{layer: [N, 2, d]} of (base, other) for the training text, the held-out text and the own text."""
        def paired(text, tokens, corruption_seed):
            acts = paired_activations(base, other, text, layers, policy, tokens=tokens, seed=corruption_seed)
            return {L: torch.stack([acts[0][L], acts[1][L]], 1) for L in layers}
        return (paired(_interleave(train_b, own_train), train_tokens, seed), paired(held_b, eval_tokens, seed + 1),
                None if own_held is None else paired(own_held, eval_tokens, seed + 1))

    train_x, held_x, own_x = harvest(target)
    null_x = None if placebo is None else harvest(placebo)
    config = {"layers": list(layers), "policy": policy, "n_latents": n_latents, "k": k, "rule": rule,
              "train_tokens": train_tokens, "eval_tokens": eval_tokens, "epochs": epochs, "seeds": seeds,
              "seed": seed, "init_stride": INIT_STRIDE, "own_text": own_batches is not None, "min_fires": min_fires,
              "low": low, "high": high, "max_nu": max_nu, "alpha": ALPHA, "batch_size": batch_size, "lr": lr,
              "sources": ["base", "target"], "source_scale": "centred, per source", "placebo": placebo is not None}
    out: dict = {"config": config, "layers": {}}
    for L in layers:
        out["layers"][str(L)] = diff_layer(
            train_x[L], held_x[L], None if own_x is None else own_x[L], n_latents=n_latents, k=k, rule=rule,
            placebo=None if null_x is None else tuple(None if t is None else t[L] for t in null_x),
            epochs=epochs, seeds=seeds, seed=seed, layer=L, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
            dead_tokens=dead_tokens, min_fires=min_fires, low=low, high=high, max_nu=max_nu, resamples=resamples,
            meta={"layer": L, "policy": policy, "base": str(base.source), "target": str(target.source)},
            save_dir=None if save_dir is None else Path(save_dir) / f"layer_{L}")
    return out


def crosscoder_lines(result: dict) -> list[str]:
    """One plain-language line per layer and side."""
    lines = []
    for L, entry in result["layers"].items():
        fve = spread(sum(r["fve"]["text"]) / 2 for r in entry["runs"])
        lines.append(f"layer {L}: crosscoder FVE (mean of the two sources) {fve['low']:.3f}–{fve['high']:.3f} over "
                     f"{len(entry['runs'])} seeds")
        for side, v in entry["verdict"].items():
            lines.append(f"  {side}: {v['words']}")
        lean = entry["lean"]
        if lean["target"] is not None:
            r = [run["lean_specificity_corr"]["mean"] for run in entry["runs"]]
            line = (f"  lean: corr(ρ, own-text specificity) {min(r):+.2f} to {max(r):+.2f} over seeds — "
                    f"{lean['target']}")
            if lean["placebo"] is not None:
                z = [run["lean_specificity_corr"]["mean"] for run in entry["placebo"]["runs"]]
                line += f"; placebo {min(z):+.2f} to {max(z):+.2f} — {lean['placebo']}"
            lines.append(line)
    return lines
