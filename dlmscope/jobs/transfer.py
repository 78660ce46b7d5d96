"""The base → instruct transfer job: train the SAEs, measure them on paired held-out tokens, add ΔLM, report.

Per layer, :func:`run_transfer` trains (or takes) a base SAE on the base model, a second base SAE from another
init seed (the seed-to-seed ceiling), a target SAE on the instruct model from its own init seed (and, optionally,
one on the AR twin as a control), then scores them with :func:`dlmscope.analysis.transfer.compare_layer` (the
measures, their ceiling, a random-SAE null and the pre-specified verdict) and splices them into the models
(:func:`~dlmscope.analysis.splice.delta_loss_by_layer`, the paper's pooled ΔLM): the base SAE and the target
SAE into the target model (one corruption for both), and the base SAE into the base model for reference. With
``own_batches`` (text of the fine-tune's own distribution, e.g. Q&A prompts) all of it is repeated on that text
beside the pre-training text.

    result = run_transfer(load_world_model("dlm"), load_world_model("instruct"), [2, 5],
                          control=load_world_model("ar"), own_batches=world_qa_batches(tokenizer))
    print("\\n".join(summary_lines(result)))
    plot_transfer(result, "transfer.png")       # from dlmscope.jobs.plots

The ``dlmscope transfer`` verb (:func:`add_parser`, :func:`run_from_args`) loads the models, runs this on the
world's corpus or ``--corpus`` (and ``--own-corpus``) and writes ``transfer.json`` and ``transfer.png``; with
``--crosscoder`` it runs the crosscoder diff instead (:mod:`.crosscoder`: shared latents over both models, which
ones the fine-tune created or removed, against a seed-to-seed and an optional ``--placebo`` null) and writes
``crosscoder.json``, ``crosscoder.png`` and the crosscoders.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import tempfile
from collections.abc import Mapping, Sequence

from dlmscope import models
from dlmscope.analysis.splice import delta_loss_by_layer
from dlmscope.analysis.transfer import (check_models, compare_layer, fve_replicate, fve_verdict_over_seeds,
                                        paired_activations, transfer_verdict)
from dlmscope.data.activations import check_policy
from dlmscope.sae.topk import TopKSAE
from dlmscope.train.log import LogConfig
from dlmscope.train.trainer import TrainConfig
from dlmscope.util import atomic
from dlmscope.world import LM_BATCH, SAE_K, SAE_LATENTS, SAE_TRAIN, SEQ_LEN, pack, world_batches
from dlmscope.world.samples import qa_sample
from .options import add_option, out_dir, positive_int, text_from_args
from .crosscoder import crosscoder_lines, run_crosscoder_diff
from .plots import plot_crosscoder, plot_transfer
from .sources import WORLD, token_batches
from .train import SweepSpec, make_saes, train_sweep

__all__ = ["WORLD_RECIPE", "WORLD_QA", "INIT_OFFSETS", "REPLICATE_STRIDE", "train_saes", "train_seed_saes",
           "world_qa_batches", "run_transfer",
           "summary_lines", "add_parser", "run_from_args"]

#: the world's SAE recipe for its tiny models (the demo's); pass ``train=`` for real models
WORLD_RECIPE = TrainConfig(**SAE_TRAIN)
#: the ``--own-corpus`` name of the world's Q&A prompts (the instruct twin's fine-tuning distribution)
WORLD_QA = "world-qa"
#: init seed = ``seed + offset`` of each SAE a run trains: each its own start (the data order is ``seed`` for all)
INIT_OFFSETS = {"base_saes": 0, "second_base_saes": 1, "instruct_saes": 2, "control_saes": 3}
#: seed replicate r's init seeds are ``seed + INIT_OFFSETS[...] + REPLICATE_STRIDE · r`` (replicate 0 the above)
REPLICATE_STRIDE = 10


def world_qa_batches(tokenizer, samples: int = 2_000, seq_len: int = SEQ_LEN, lm_batch: int = LM_BATCH,
                     seed: int = 0) -> list:
    """``[lm_batch, seq_len]`` LM batches of ``samples`` of the world's Q&A items (question, ``answer :``, answer)
    packed one after another: the instruct twin's own distribution, as held-out text for :func:`run_transfer`."""
    rng = random.Random(seed)
    return list(pack([qa_sample(rng) for _ in range(samples)], tokenizer, seq_len).split(lm_batch))


# ------------------------------------------------------------------------------------------------- training
def train_saes(adapter, token_batches, layers: Sequence[int], policy: str, *, n_latents: int, k: int,
               tokens: int, seed: int = 0, init_seed: int | None = None, train: TrainConfig | None = None,
               batch_size: int = 1024, label: str = "") -> dict[int, TopKSAE]:
    """``{layer: TopKSAE}``: one SAE per layer trained on ``tokens`` activations of ``adapter`` through
    :func:`~dlmscope.jobs.train.train_sweep` (one harvest for all layers, cached in a temporary directory).

    ``seed`` fixes the data order and corruption; the initialisation depends on ``(init_seed, layer)`` only
    (default ``init_seed = seed``, as in :func:`.train.train_sweep`): equal init seeds give a shared start.
    """
    got = train_seed_saes(adapter, token_batches, layers, policy, n_latents=n_latents, k=k, tokens=tokens, seed=seed,
                          init_seeds=[seed if init_seed is None else init_seed], train=train, batch_size=batch_size,
                          label=label)
    return {L: saes[0] for L, saes in got.items()}


def train_seed_saes(adapter, token_batches, layers: Sequence[int], policy: str, *, n_latents: int, k: int,
                    tokens: int, seed: int, init_seeds: Sequence[int], train: TrainConfig | None = None,
                    batch_size: int = 1024, label: str = "") -> dict[int, list[TopKSAE]]:
    """``{layer: [TopKSAE per init seed]}``: :func:`train_saes` for several init seeds at once, trained side by
    side on one harvest (the same data order; only the initialisation differs)."""
    spec = SweepSpec(layers=tuple(layers), ks=(k,), n_latents=n_latents, policy=policy, tokens=tokens,
                     batch_size=batch_size, seed=seed)
    start = {L: [make_saes(adapter.d_model, dataclasses.replace(spec, seed=s), L, {"model": str(adapter.source)})[0]
                 for s in init_seeds] for L in spec.layers}
    with tempfile.TemporaryDirectory(prefix="dlmscope-transfer-") as cache:
        return train_sweep(adapter, token_batches, spec, train or WORLD_RECIPE, cache_dir=cache, saes=start,
                           log=LogConfig(log_every=25), label=label)


def _pick(saes: Mapping, layer: int, k: int, d_model: int, n_latents: int, what: str):
    """The SAE for ``layer`` from ``{layer: SAE or [SAE per k]}`` (a list: the one with this ``k``), checked
    against the model's hidden size and the run's ``n_latents``."""
    if layer not in saes:
        raise ValueError(f"{what} has no SAE for layer {layer} (it has layers {sorted(saes)})")
    got = saes[layer]
    if isinstance(got, (list, tuple)):
        match = [s for s in got if s.k == k]
        if not match:
            raise ValueError(f"{what}[{layer}] has no SAE with k={k} (ks {[s.k for s in got]})")
        got = match[0]
    if got.d != d_model:
        raise ValueError(f"{what}[{layer}] has d={got.d} but the model's hidden size is d_model={d_model}")
    if got.n != n_latents:
        raise ValueError(f"{what}[{layer}] has n={got.n} latents but n_latents={n_latents}: SAEs of different n "
                         f"cannot be matched one to one (pass n_latents={got.n})")
    if got.k != k:
        raise ValueError(f"{what}[{layer}] has k={got.k} but k={k}")
    return got


# ------------------------------------------------------------------------------------------------ the run
def run_transfer(base_adapter, instruct_adapter, layers: Sequence[int], *, policy: str = "unmask",
                 n_latents: int = SAE_LATENTS, k: int = SAE_K, train_tokens: int = 200_000, eval_tokens: int = 30_000,
                 delta_batches: int = 12, seed: int = 0, control=None, base_saes: Mapping | None = None,
                 second_base_saes: Mapping | None = None, instruct_saes: Mapping | None = None,
                 control_saes: Mapping | None = None, batches: tuple[Sequence, Sequence] | None = None,
                 own_batches: Sequence | None = None, ceiling: bool = True, sentences: int = 100_000,
                 train: TrainConfig | None = None, sae_batch: int = 1024, target_init_seed: int | None = None,
                 seq_len: int = SEQ_LEN, lm_batch: int = LM_BATCH, resamples: int = 2000, seeds: int = 1) -> dict:
    """Base → instruct SAE transfer at each of ``layers``; returns a JSON-able dict.

    SAEs: ``base_saes`` / ``second_base_saes`` / ``instruct_saes`` / ``control_saes`` ``{layer: SAE or [SAE per
    k]}`` are used as given (a list: its ``k`` SAE; every layer, ``n_latents`` latents); when ``None`` they are
    trained here on ``train_tokens`` activations of ``policy`` (:func:`train_saes`, recipe ``train``, default the
    demo's, data order ``seed``), each from its own init seed ``seed + INIT_OFFSETS[...]`` — unless
    ``target_init_seed`` gives the instruct and control SAEs that one (``seed``: the base SAE's start, then
    ``decoder_init`` is reported). ``ceiling=False`` skips the second base SAE (no ceiling, no verdict).
    ``batches``: ``(train, heldout)`` LM batches, default the embedded world's corpus (``sentences`` sentences in
    ``seq_len``-token rows, ``lm_batch`` rows per batch, split by ``seed``); both models see the same text.
    ``own_batches``: optional held-out LM batches of the fine-tune's own distribution (e.g.
    :func:`world_qa_batches`), evaluated beside the pre-training text. Evaluation runs on ``eval_tokens`` paired
    held-out tokens (corruption seed ``seed + 1``, as :func:`.train.heldout_activations`) and ΔLM (pooled, with
    stratified t) on the first ``delta_batches`` held-out batches (corruption seed ``seed + 7``, as the demo's).

    ``control``: optionally the AR twin (an adapter): its ``clean``-policy SAE against the base SAE on clean text,
    as the reference for "a different model".

    ``seeds`` > 1 trains that many seed replicates of the base, second-base and instruct SAEs (replicate r from
    init seeds ``seed + INIT_OFFSETS[...] + REPLICATE_STRIDE · r``; replicate 0 is the run's main SAEs, the data
    order shared) and judges the FVE ratio over them (:func:`~dlmscope.analysis.transfer.fve_verdict_over_seeds`:
    min–max over replicates, the worst replicate's outcome); the other measures stay replicate 0's, intervals over
    latents. It needs the SAEs trained here and the ceiling.

    Result: ``config``; ``layers[str(L)]`` with ``instruct`` (:func:`compare_layer` — with ``ceiling``, ``null``
    and ``verdict`` when there is a second base SAE — plus ``delta``: ``base_in_base``, ``base_in_target``,
    ``target_in_target``), ``instruct_own_text`` (the same on ``own_batches``) and ``control``;
    ``summary[str(L)]`` with the headline numbers and verdicts (see :func:`summary_lines`).
    """
    policy = check_policy(policy)
    check_models(base_adapter, instruct_adapter, policy)
    layers = instruct_adapter.check_layers(base_adapter.check_layers(layers))
    if control is not None:
        check_models(base_adapter, control, "clean")
        control.check_layers(layers)
    d = base_adapter.d_model
    # the given SAEs are checked before any work: every layer, this k, the model's d and n_latents
    given = {what: None if saes is None else {L: _pick(saes, L, k, d, n_latents, what) for L in layers}
             for what, saes in (("base_saes", base_saes), ("second_base_saes", second_base_saes),
                                ("instruct_saes", instruct_saes), ("control_saes", control_saes))}
    if base_adapter.tokenizer is None and batches is None:
        raise ValueError("the base model has no tokenizer; pass batches=(train, heldout) token batches")
    if delta_batches < 1:
        raise ValueError(f"delta_batches must be >= 1, got {delta_batches}")
    train_b, held_b = batches if batches is not None else world_batches(base_adapter.tokenizer, sentences, seq_len,
                                                                        lm_batch, seed)
    held_b = list(held_b)
    if not held_b:
        raise ValueError("run_transfer needs held-out token batches")
    own_b = None if own_batches is None else list(own_batches)
    if own_b is not None and not own_b:
        raise ValueError("own_batches is empty: pass held-out batches of the fine-tune's own text, or None")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if seeds > 1 and (not ceiling or target_init_seed is not None
                      or any(given[w] is not None for w in ("base_saes", "second_base_saes", "instruct_saes"))):
        raise ValueError("seeds > 1 needs the ceiling, the base, second-base and instruct SAEs trained here, each "
                         "from its own init seed (no target_init_seed)")
    spec = SweepSpec(layers=tuple(layers), ks=(k,), n_latents=n_latents, policy=policy, tokens=train_tokens,
                     batch_size=sae_batch, seed=seed)

    def saes_for(adapter, whats, pol) -> dict[str, list[dict]]:
        """``{what: [{layer: SAE} per seed replicate]}``: the given SAEs, or ones trained now (every ``what`` and
        replicate side by side on one harvest of ``adapter``)."""
        out = {w: [given[w]] for w in whats if given[w] is not None}
        todo = [(w, r) for w in whats if given[w] is None for r in range(seeds if w != "control_saes" else 1)]
        if todo:
            inits = [seed + INIT_OFFSETS[w] + REPLICATE_STRIDE * r
                     if target_init_seed is None or w.endswith("base_saes") else target_init_seed for w, r in todo]
            got = train_seed_saes(adapter, train_b, layers, pol, n_latents=n_latents, k=k, tokens=train_tokens,
                                  seed=seed, init_seeds=inits, train=train, batch_size=sae_batch,
                                  label="+".join(dict.fromkeys(w for w, _ in todo)))
            for j, (w, _) in enumerate(todo):
                out.setdefault(w, []).append({L: got[L][j] for L in layers})
        return out

    on_base = saes_for(base_adapter, ["base_saes"] + (["second_base_saes"] if ceiling else []), policy)
    base, base_trained = on_base["base_saes"][0], given["base_saes"] is None
    second = on_base["second_base_saes"][0] if ceiling else None
    instruct = saes_for(instruct_adapter, ["instruct_saes"], policy)["instruct_saes"]
    texts = [("", held_b)] + ([("_own_text", own_b)] if own_b is not None else [])
    targets = [("instruct", instruct_adapter, instruct[0], given["instruct_saes"] is None, policy)]
    if control is not None:
        targets.append(("control", control, saes_for(control, ["control_saes"], "clean")["control_saes"][0],
                        given["control_saes"] is None, "clean"))

    out: dict = {"config": {"layers": list(layers), "policy": policy, "control_policy": "clean",
                            "n_latents": n_latents, "k": k, "train_tokens": train_tokens, "eval_tokens": eval_tokens,
                            "delta_batches": delta_batches, "seed": seed, "control": control is not None,
                            "target_init_seed": target_init_seed, "init_offsets": INIT_OFFSETS,
                            "ceiling": ceiling, "own_text": own_b is not None, "cosine": "signed",
                            "delta_estimator": "pooled", "verdict_intervals_over": "latents", "seeds": seeds,
                            "replicate_stride": REPLICATE_STRIDE},
                 "layers": {str(L): {} for L in layers}}
    shared_init = base_trained and target_init_seed == seed
    for name, adapter, target, trained, pol in targets:
        for suffix, held in texts:
            if suffix and name == "control":
                continue  # the fine-tune's own text is the instruct model's question
            acts_b, acts_t = paired_activations(base_adapter, adapter, held, layers, pol, tokens=eval_tokens,
                                                seed=seed + 1)
            delta_ids = held[:delta_batches]
            in_target = delta_loss_by_layer(adapter, {L: [base[L], target[L]] for L in layers}, delta_ids,
                                            seed=seed + 7)
            in_base = (delta_loss_by_layer(base_adapter, {L: [base[L]] for L in layers}, delta_ids, seed=seed + 7)
                       if name == "instruct" else None)
            for L in layers:
                init = make_saes(d, spec, L)[0] if shared_init and trained else None
                entry = compare_layer(base[L], target[L], acts_b[L], acts_t[L], init_sae=init,
                                      second_base_sae=None if second is None else second[L], resamples=resamples,
                                      seed=seed)
                if seeds > 1 and name == "instruct":
                    # replicate 0 is the SAEs compare_layer just scored; the others are scored here
                    reps = [{"ratio": entry["fve"]["ratio"], "ceiling_ratio": entry["ceiling"]["fve_ratio"],
                             "null_ratio": entry["null"]["fve_ratio"]}]
                    reps += [fve_replicate(b[L], s2[L], t[L], acts_b[L], acts_t[L]) for b, s2, t in
                             zip(on_base["base_saes"][1:], on_base["second_base_saes"][1:], instruct[1:])]
                    measures = {**entry["verdict"]["measures"], "fve_ratio": fve_verdict_over_seeds(reps)}
                    entry["verdict"] = {**transfer_verdict(measures), "measures": measures}
                entry["delta"] = {"base_in_target": in_target[L][0], "target_in_target": in_target[L][1]}
                if in_base is not None:
                    entry["delta"]["base_in_base"] = in_base[L][0]
                out["layers"][str(L)][name + suffix] = entry
    out["summary"] = {str(L): _layer_summary(out["layers"][str(L)]) for L in layers}
    return out


def _layer_summary(entry: dict) -> dict:
    """Headline numbers of one layer (the control's prefixed ``control_``, the fine-tune's own text's ``own_``),
    with the fraction of loss recovered vs zero-ablation (the DLM's ``L_mask`` one, or the AR one) of the base
    and the target SAE in the target, and, with a ceiling, its numbers, the null's and the verdict."""
    out = {}
    prefixes = {"instruct": "", "control": "control_", "instruct_own_text": "own_"}
    for name, e in entry.items():
        f, dec, cor = e["fve"], e["decoder"], e["correlation"]
        vals = {**{f"fve_{c}": f[c]["fve"] for c in ("base_on_base", "base_on_target", "target_on_target")},
                "fve_ratio": f["ratio"], "alive_jaccard": e["alive"]["jaccard"], "corr_median": cor["median"],
                "corr_frac_gt_0.9": cor["corr_frac_gt_0.9"], "matched_corr_median": e["matched_correlation"]["median"],
                **{key: dec[key] for key in ("max_cos_mean", "hungarian_mean", "hungarian_frac_gt_0.9",
                                             "hungarian_frac_gt_0.7", "identity_fraction")},
                **{f"chance_{key}": e["decoder_chance"][key] for key in ("max_cos_mean", "hungarian_mean")},
                **{f"recovered_{c}": d.get("mask_recovered", d.get("recovered", math.nan))
                   for c, d in e["delta"].items() if c != "base_in_base"}}
        if "decoder_init" in e:
            vals["init_hungarian_mean"] = e["decoder_init"]["hungarian_mean"]
        if "ceiling" in e:
            c, z, v = e["ceiling"], e["null"], e["verdict"]
            vals.update({"ceiling_fve_ratio": c["fve_ratio"], "ceiling_hungarian_mean": c["decoder"]["hungarian_mean"],
                         "ceiling_matched_corr_median": c["matched_correlation"]["median"],
                         "null_fve_ratio": z["fve_ratio"],
                         "null_matched_corr_median": z["matched_correlation"]["median"],
                         "verdict": v["outcome"], "verdict_words": v["words"],
                         **{f"{m}_outcome": mv["outcome"] for m, mv in v["measures"].items()}})
            over = v["measures"]["fve_ratio"].get("over_seeds")
            if over:  # the FVE ratio judged over seed replicates: their mean and min–max
                vals["seeds"] = v["measures"]["fve_ratio"]["seeds"]
                for name_, key in (("fve_ratio", "ratio"), ("ceiling_fve_ratio", "ceiling_ratio"),
                                   ("null_fve_ratio", "null_ratio")):
                    vals.update({f"{name_}_seeds_{q}": over[key][q] for q in ("mean", "low", "high")})
        out.update({prefixes.get(name, name + "_") + key: val for key, val in vals.items()})
    return out


def summary_lines(result: dict) -> list[str]:
    """One plain-language line per layer: how much of the base SAE survives on the instruct model, read against
    two base SAEs of different seeds (the ceiling) and a random SAE (the null) where the run had them."""
    lines = []
    for L, s in result["summary"].items():
        line = (f"layer {L}: base SAE on instruct keeps {s['fve_ratio']:.0%} of the instruct SAE's FVE "
                f"({s['fve_base_on_target']:.3f} vs {s['fve_target_on_target']:.3f}; on base "
                f"{s['fve_base_on_base']:.3f}); Hungarian-matched decoder rows: mean cos {s['hungarian_mean']:.2f}, "
                f"{s['hungarian_frac_gt_0.9']:.0%} > 0.9 (chance mean {s['chance_hungarian_mean']:.2f}); median "
                f"latent correlation {s['corr_median']:.2f}; alive Jaccard {s['alive_jaccard']:.2f}")
        if "seeds" in s:
            line += (f" | over {s['seeds']} seed replicates: FVE ratio {s['fve_ratio_seeds_low']:.3f}–"
                     f"{s['fve_ratio_seeds_high']:.3f} (ceiling {s['ceiling_fve_ratio_seeds_low']:.3f}–"
                     f"{s['ceiling_fve_ratio_seeds_high']:.3f})")
        if "verdict" in s:
            line += (f" | seed-to-seed ceiling: FVE ratio {s['ceiling_fve_ratio']:.2f}, Hungarian mean "
                     f"{s['ceiling_hungarian_mean']:.2f}, matched-latent r {s['ceiling_matched_corr_median']:.2f} "
                     f"(instruct {s['matched_corr_median']:.2f}) — {s['verdict_words']}")
        if "own_verdict" in s:
            line += (f" | on the fine-tune's own text: FVE ratio {s['own_fve_ratio']:.2f} (ceiling "
                     f"{s['own_ceiling_fve_ratio']:.2f}) — {s['own_verdict_words']}")
        elif "own_fve_ratio" in s:
            line += f" | on the fine-tune's own text: FVE ratio {s['own_fve_ratio']:.2f}"
        if "control_fve_ratio" in s:
            line += (f" | AR control: FVE ratio {s['control_fve_ratio']:.0%}, Hungarian mean "
                     f"{s['control_hungarian_mean']:.2f}, median correlation {s['control_corr_median']:.2f}")
        lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------------- the verb
def add_parser(subparsers) -> argparse.ArgumentParser:
    """``dlmscope transfer``: base-model SAEs on the post-trained model."""
    t = subparsers.add_parser("transfer", help="base-model SAEs on the post-trained model: FVE, delta-LM, latent "
                                               "agreement, decoder matching; JSON + plot")
    t.add_argument("--base", required=True, help="the base model (SAEs are trained on it)")
    t.add_argument("--target", required=True, help="its post-trained version (e.g. the instruct model)")
    t.add_argument("--control", default=None, help="optional: a different model (e.g. the AR twin) as reference")
    t.add_argument("--crosscoder", action="store_true",
                   help="instead of matching separately trained SAEs, train crosscoders on paired activations of both "
                        "models: latents the fine-tune created or removed, with a seed-to-seed null; writes "
                        "crosscoder.json, crosscoder.png and crosscoders/layer_<L>/seed_<r>")
    t.add_argument("--placebo", default=None,
                   help="with --crosscoder: the base fine-tuned on nothing new (same recipe, base text only), the "
                        "count null for exclusive latents")
    add_option(t, "--layers")
    t.add_argument("--policy", default="unmask", help="mask | unmask | clean")
    add_option(t, "--corpus", help="as for train; 'world' is the embedded corpus")
    t.add_argument("--own-corpus", default=None,
                   help=f"optional: text of the fine-tune's own distribution (a text source as --corpus, or "
                        f"{WORLD_QA!r}: the world's Q&A prompts), evaluated beside the pre-training text")
    t.add_argument("--no-ceiling", action="store_true",
                   help="skip the second base SAE (no seed-to-seed ceiling, no verdict)")
    t.add_argument("--seeds", type=positive_int, default=None,
                   help="seed replicates of the base, second-base and instruct SAEs (default 1); > 1 judges the FVE "
                        "ratio over them (min–max, the worst replicate's outcome). With --crosscoder: crosscoder "
                        "init seeds (default 3, at least 2)")
    t.add_argument("--n", type=positive_int, default=SAE_LATENTS)
    t.add_argument("--k", type=positive_int, default=SAE_K)
    t.add_argument("--tokens", type=positive_int, default=200_000, help="training tokens per SAE")
    t.add_argument("--eval-tokens", type=positive_int, default=30_000)
    t.add_argument("--delta-batches", type=positive_int, default=12)
    add_option(t, "--seq-len")
    for flag in ("--lm-batch", "--text-field", "--split"):   # the same options as train's, their help left out
        add_option(t, flag, help=None)
    add_option(t, "--sentences", default=100_000, help="world corpus size")
    add_option(t, "--seed")
    add_option(t, "--out")
    t.set_defaults(func=run_from_args)
    return t


def run_from_args(args: argparse.Namespace) -> int:
    """Run the transfer; write ``transfer.json`` and ``transfer.png`` under ``--out`` and print the summary."""
    out = out_dir(args.out)
    check_policy(args.policy)
    if args.crosscoder and (args.control or args.no_ceiling):
        raise ValueError("--control and --no-ceiling belong to the SAE transfer, not to --crosscoder")
    if args.placebo and not args.crosscoder:
        raise ValueError("--placebo is the crosscoder's null: use it with --crosscoder")
    if args.crosscoder and args.seeds is not None and args.seeds < 2:
        raise ValueError("--crosscoder needs --seeds >= 2: the seed-to-seed null needs a pair of seeds")
    base, target = models.load(args.base), models.load(args.target)
    text = None if args.corpus == WORLD else text_from_args(base, args)
    own = None  # (train, heldout) LM batches of the fine-tune's own text; the SAE transfer reads only heldout
    if args.own_corpus == WORLD_QA:
        def qa(s):
            return world_qa_batches(base.tokenizer, seq_len=args.seq_len, lm_batch=args.lm_batch, seed=s)
        own = (qa(args.seed + 1) if args.crosscoder else None, qa(args.seed))
    elif args.own_corpus is not None:
        own = tuple(list(b) for b in token_batches(args.own_corpus, base.tokenizer, seq_len=args.seq_len,
                                                   lm_batch=args.lm_batch, text_field=args.text_field,
                                                   split=args.split, seed=args.seed))
    if args.crosscoder:
        placebo = models.load(args.placebo) if args.placebo else None
        result = run_crosscoder_diff(base, target, args.layers, placebo=placebo, policy=args.policy, n_latents=args.n,
                                     k=args.k, train_tokens=args.tokens, eval_tokens=args.eval_tokens,
                                     seeds=args.seeds or 3, seed=args.seed, batches=text, own_batches=own,
                                     sentences=args.sentences, seq_len=args.seq_len, lm_batch=args.lm_batch,
                                     save_dir=out / "crosscoders")
        atomic.write_json(out / "crosscoder.json", result)
        plot_crosscoder(result, out / "crosscoder.png")
        print("\n".join(crosscoder_lines(result)))
        print(f"wrote {out / 'crosscoder.json'}, {out / 'crosscoder.png'} and {out / 'crosscoders'}")
        return 0
    control = models.load(args.control) if args.control else None
    result = run_transfer(base, target, args.layers, policy=args.policy, n_latents=args.n, k=args.k,
                          train_tokens=args.tokens, eval_tokens=args.eval_tokens, delta_batches=args.delta_batches,
                          seed=args.seed, control=control, batches=text, own_batches=None if own is None else own[1],
                          ceiling=not args.no_ceiling, sentences=args.sentences, seq_len=args.seq_len,
                          lm_batch=args.lm_batch, seeds=args.seeds or 1)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "transfer.json", result)
    plot_transfer(result, out / "transfer.png")
    print("\n".join(summary_lines(result)))
    print(f"wrote {out / 'transfer.json'} and {out / 'transfer.png'}")
    return 0
