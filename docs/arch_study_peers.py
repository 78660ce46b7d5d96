"""The peers' side of docs/arch_study.py: SAELens's own trainer on the same planted data, same budget, measured by us.

Two steps, two interpreters (dlmscope is not installed beside sae-lens, and the measurement is ours):

1. ``train`` — run with the peer venv's python (sae-lens installed). It regenerates arch_study.py's planted data
   by executing that file's constants and its ``PlantedData`` class from its source (``ast``; its other statements,
   the dlmscope imports among them, are skipped), so there is one definition of the data. For each seed and each
   setting it trains SAELens's own training SAE (``TopKTrainingSAE``, ``BatchTopKTrainingSAE``,
   ``MatryoshkaBatchTopKTrainingSAE``, ``JumpReLUTrainingSAE``) with SAELens's own ``SAETrainer.fit()`` on an
   in-memory iterator over the same 800 batches × 512 rows arch_study.py trains on, and saves it with SAELens's own
   ``save_inference_model`` (a BatchTopK / Matryoshka SAE becomes the JumpReLU SAELens saves). It records a SHA-256
   of every batch the trainer consumed, SAELens's own held-out FVE and L0 of each saved file (loaded back with
   ``SAE.load_from_disk``, a check on our loader), and (``inits``, also a step of its own) how many planted
   directions each initial decoder already matches.
2. ``eval`` — run with dlmscope's python. It checks that arch_study.py's ``PlantedData`` gives the same bytes as
   those SHA-256s, loads every saved SAELens file with ``dlmscope.sae.load`` and measures it with
   :func:`measure`, the measurement of ``arch_study.train_seed``. Our side is trained here through
   ``arch_study.train_seed`` on arch_study.py's own ``SEEDS`` (its recipe and its init check, ``check_init``), so
   that :func:`measure` runs on the SAE objects themselves. It checks that :func:`measure` gives train_seed's own
   figures, compares them with arch_study.json, and writes arch_study_peers.json and arch_study_peers.md.

The SAELens recipe, where it is not the library's default, is set to arch_study.py's budget: ``lr`` 4e-3, linear
warmup 50 steps, constant, linear decay to 0 over the last 160 steps (arch_study's ``decay_fraction`` 0.2);
``dead_feature_window`` 50 steps (arch_study's ``dead_tokens`` = 50 batches; SAELens's default of 1000 steps is more
than the run, so AuxK would never start); activations scaled to E|x|² = d (``expected_average_only_in``, the
scale SAELens's JumpReLU λ is stated in, the one our ``l0_coefficient`` mirrors) from the same first 5 batches
arch_study's norm factor uses; Matryoshka widths n/8, n/4, n/2, n. Everything else is SAELens's default (AuxK
coefficient 1, decoder rows treated as normalised, decoder init norm 0.1, BatchTopK threshold rate 0.01 =
arch_study's β 0.99, JumpReLU θ₀ 0.01, bandwidth 0.05, step L0 loss, grad-norm clip 1). Init seeds 0, 1, 2 through
``torch.manual_seed`` (SAELens's own code draws the init, so it shares no draws with ``PlantedData``; ``inits``
records that no initial decoder matches a planted direction).

    /tmp/peers-venv/bin/python docs/arch_study_peers.py train [--work DIR]
    .venv/bin/python docs/arch_study_peers.py eval [--work DIR] [--out docs]
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import subprocess
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STUDY = HERE / "arch_study.py"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "arch_study_peers"
HELD_SEED, HELD_ROWS, STREAM_SEED = 99, 8192, 7      # arch_study.py's held-out draw and stream seed
KEYS = ("fve", "l0", "l0_std", "recovered", "dead")
NORM_BATCHES, LR, WARMUP, DECAY_FRACTION, DEAD_STEPS = 5, 4e-3, 50, 0.2, 50   # arch_study.py's TrainConfig


def study_namespace() -> dict:
    """arch_study.py's module-level constants and ``PlantedData``, executed from its source with torch only."""
    tree = ast.parse(STUDY.read_text(), str(STUDY))
    keep = [node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            or (isinstance(node, ast.ClassDef) and node.name == "PlantedData")]
    ns = {"torch": torch, "__name__": "arch_study_source"}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(STUDY), "exec"), ns)
    return ns


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- step 1: SAELens (peer venv) ----------------------------------------------------------------------------------


def peer_settings(ns: dict) -> list[tuple[str, str, dict]]:
    """(label, SAELens training architecture, its config fields) for each SAE of a seed, arch_study's grid."""
    n = ns["N"]
    out = []
    for k in ns["KS"]:
        out += [(f"topk k={k}", "topk", {"k": k}), (f"batchtopk k={k}", "batchtopk", {"k": k}),
                (f"matryoshka k={k}", "matryoshka_batchtopk",
                 {"k": k, "matryoshka_widths": [n // 8, n // 4, n // 2, n]})]
    out += [(f"jumprelu λ={lam:g}", "jumprelu", {"l0_coefficient": lam}) for lam in ns["L0_COEFFICIENTS"]]
    return out


def peer_classes() -> dict:
    """SAELens training architecture -> (its TrainingSAE class, its config class)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    return {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
            "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
            "matryoshka_batchtopk": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig),
            "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig)}


def make_peer_sae(ns: dict, seed: int, arch: str, fields: dict):
    """The SAELens training SAE of one run, its init drawn after ``torch.manual_seed(seed)``."""
    sae_cls, cfg_cls = peer_classes()[arch]
    torch.manual_seed(seed)
    return sae_cls(cfg_cls(d_in=ns["D"], d_sae=ns["N"], normalize_activations="expected_average_only_in", **fields))


def peer_inits(work: Path, seeds: list[int]) -> dict:
    """The share of planted directions each SAELens init already matches (arch_study's ``recovered`` of the
    initial decoder), written to ``inits.json``; cheap (no training)."""
    ns = study_namespace()
    data = ns["PlantedData"]()
    out = {str(seed): {label: data.recovered(make_peer_sae(ns, seed, arch, fields).W_dec)
                       for label, arch, fields in peer_settings(ns)} for seed in seeds}
    work.mkdir(parents=True, exist_ok=True)
    (work / "inits.json").write_text(json.dumps(out, indent=2, ensure_ascii=False))
    return out


def train(work: Path, seeds: list[int]) -> int:
    import sae_lens
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    classes = peer_classes()
    peer_inits(work, seeds)
    ns = study_namespace()
    data, steps, rows, d, n = ns["PlantedData"](), ns["STEPS"], ns["ROWS"], ns["D"], ns["N"]
    held = data.batch(torch.Generator().manual_seed(HELD_SEED), HELD_ROWS)
    decay = steps - int(steps * (1 - DECAY_FRACTION))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * rows, train_batch_size_samples=rows, lr=LR, lr_end=LR,
        lr_scheduler_name="constant", lr_warm_up_steps=WARMUP, lr_decay_steps=decay,
        dead_feature_window=DEAD_STEPS, n_batches_for_norm_estimate=NORM_BATCHES,
        logger=LoggingConfig(log_to_wandb=False), device="cpu")
    work.mkdir(parents=True, exist_ok=True)
    runs, stream_digests, started = [], set(), time.perf_counter()
    for seed in seeds:
        for label, arch, fields in peer_settings(ns):
            sae = make_peer_sae(ns, seed, arch, fields)
            h, consumed = hashlib.sha256(), [0]

            def provider():
                yield from data.stream(NORM_BATCHES, seed=STREAM_SEED)   # the scaler's estimate: the first 5 batches
                for x in data.stream(steps, seed=STREAM_SEED):            # training: the 800 batches ours sees
                    h.update(x.contiguous().numpy().tobytes())
                    consumed[0] += 1
                    yield x

            t0 = time.perf_counter()
            SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider()).fit()
            seconds = time.perf_counter() - t0
            if consumed[0] != steps:
                raise RuntimeError(f"{label}: SAELens's trainer took {consumed[0]} training batches, not {steps}")
            stream_digests.add(h.hexdigest())
            path = work / f"seed{seed}" / label.replace(" ", "_").replace("λ", "lambda")
            sae.save_inference_model(str(path))
            inference = SAE.load_from_disk(str(path))
            with torch.no_grad():
                acts = inference.encode(held)
                recon = inference.decode(acts)
            fve = 1 - (held - recon).var(0, unbiased=False).sum() / held.var(0, unbiased=False).sum()
            runs.append({"seed": seed, "label": label, "saelens_architecture": arch, "fields": fields,
                         "path": str(path.relative_to(work)), "saved_architecture": inference.cfg.architecture(),
                         "saelens_fve": float(fve), "saelens_l0": float((acts > 0).sum(-1).float().mean()),
                         "seconds": seconds})
            print(f"seed {seed} {label:18s} FVE {float(fve):.3f}  L0 {runs[-1]['saelens_l0']:.2f}", flush=True)
    if len(stream_digests) != 1:
        raise RuntimeError("the SAEs did not all see the same stream")
    manifest = {
        "versions": {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
        "code_path": "sae_lens.training.sae_trainer.SAETrainer(cfg, sae, data_provider=<iterator>).fit(), "
                     "then TrainingSAE.save_inference_model",
        "trainer_cfg": {k: getattr(trainer_cfg, k) for k in (
            "total_training_samples", "train_batch_size_samples", "lr", "lr_end", "lr_scheduler_name",
            "lr_warm_up_steps", "lr_decay_steps", "adam_beta1", "adam_beta2", "dead_feature_window",
            "n_batches_for_norm_estimate")},
        "sae_defaults": {arch: {k: v for k, v in cfg_cls(d_in=d, d_sae=n, **({"matryoshka_widths": [n]}
                                                         if arch == "matryoshka_batchtopk" else {})).to_dict().items()
                                if k not in ("metadata", "d_in", "d_sae", "device", "dtype")}
                         for arch, (_, cfg_cls) in classes.items()},
        "normalize_activations": "expected_average_only_in",
        "data": {"stream_sha256": stream_digests.pop(), "held_sha256": digest([held]),
                 "truth_sha256": digest([data.truth]), "source": "arch_study.py's constants and PlantedData, "
                 "executed from its source (ast)"},
        "seeds": seeds, "runs": runs, "seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return 0


# ---- step 2: measurement (dlmscope venv) ----------------------------------------------------------------------------


def measure(sae, held: torch.Tensor, data) -> dict:
    """arch_study.train_seed's held-out measurement of one SAE (eval-mode rules), as a function."""
    from dlmscope import reference as R
    n = sae.cfg.n
    with torch.no_grad():
        sae.eval()
        values, indices = sae.encode(held)
        per_row = (values > 0).sum(-1).float()
        fired = torch.zeros(n, dtype=torch.bool)
        fired[indices[values > 0]] = True
        return {"arch": sae.cfg.arch, "fve": float(R.fraction_of_variance_explained(held, sae.decode(values, indices))),
                "l0": float(per_row.mean()), "l0_std": float(per_row.std()), "recovered": data.recovered(sae.W_dec),
                "dead": float((~fired).float().mean())}


def train_ours(study, data, held: torch.Tensor, seeds) -> tuple[list[dict], dict]:
    """Our side: each seed through ``arch_study.train_seed`` (its SAEs recorded as make_saes builds them), measured
    by :func:`measure`; plus the recovery of each initial decoder (train_seed's ``check_init`` refuses any above 0)
    and the largest difference between :func:`measure` and train_seed's own figures (0 if they are one
    measurement)."""
    per_seed, inits, gap = [], {}, 0.0
    make = study.make_saes
    for seed in seeds:
        made = []

        def recording(s):
            made.extend(make(s))
            inits[str(s)] = {study.label(sae): data.recovered(sae.W_dec) for sae in made}
            return made
        study.make_saes = recording
        try:
            own = study.train_seed(data, seed)
        finally:
            study.make_saes = make
        mine = {study.label(sae): measure(sae, held, data) for sae in made}
        gap = max([gap] + [abs(own[name][key] - mine[name][key]) for name in own for key in KEYS])
        per_seed.append(mine)
        print(f"ours, seed {seed}: trained", flush=True)
    return per_seed, {"inits_recovered": inits, "max_abs_diff_measure_vs_train_seed": gap}


def largest_gap(a: dict, b: dict) -> dict:
    """The largest |a - b| over the SAEs and figures of two per-seed dicts, and where."""
    name, key = max(((n, k) for n in a for k in KEYS), key=lambda nk: abs(a[nk[0]][nk[1]] - b[nk[0]][nk[1]]))
    return {"max_abs_diff": abs(a[name][key] - b[name][key]), "sae": name, "figure": key,
            "values": [a[name][key], b[name][key]]}


def pareto(points: dict) -> set:
    """Labels whose (mean L0, mean FVE) no other point beats (L0 <= and FVE >=, one strictly)."""
    out = set()
    for a, (l0a, fa) in points.items():
        if not any((l0b <= l0a and fb >= fa) and (l0b < l0a or fb > fa) for b, (l0b, fb) in points.items() if b != a):
            out.add(a)
    return out


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True).stdout


def evaluate(work: Path, out: Path) -> int:
    # the library's state as this process imports it (other work may commit while it runs)
    head, json_commit = (git("rev-parse", "HEAD").strip(),
                         git("log", "-1", "--format=%H", "--", "arch_study.json").strip())
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "../dlmscope").split("\n") if line.strip()]
    from dlmscope.sae import load
    sys.path.insert(0, str(HERE))
    import arch_study as study

    manifest = json.loads((work / "manifest.json").read_text())
    ours = json.loads((out / "arch_study.json").read_text())
    data = study.PlantedData()
    held = data.batch(torch.Generator().manual_seed(HELD_SEED), HELD_ROWS)
    stream = digest(data.stream(study.STEPS, seed=STREAM_SEED))
    same = {"stream": stream == manifest["data"]["stream_sha256"],
            "held": digest([held]) == manifest["data"]["held_sha256"],
            "truth": digest([data.truth]) == manifest["data"]["truth_sha256"]}
    if not all(same.values()):
        raise RuntimeError(f"the peer step's data differ from arch_study.py's: {same}")
    per_seed: dict[int, dict] = {}
    loader_gap = {"fve": 0.0, "l0": 0.0}
    for run in manifest["runs"]:
        sae = load(work / run["path"])
        m = measure(sae, held, data)
        m["loaded_as"] = type(sae).__name__
        loader_gap["fve"] = max(loader_gap["fve"], abs(m["fve"] - run["saelens_fve"]))
        loader_gap["l0"] = max(loader_gap["l0"], abs(m["l0"] - run["saelens_l0"]))
        per_seed.setdefault(run["seed"], {})[run["label"]] = m
    peers = study.summarise([per_seed[s] for s in sorted(per_seed)])
    seeds = list(study.SEEDS)
    mine, check = train_ours(study, data, held, seeds)
    recorded = dict(zip(ours["config"]["seeds"], ours["per_seed"]))
    check["rerun_vs_arch_study_json"] = {str(seed): largest_gap(m, recorded[seed])
                                         for seed, m in zip(seeds, mine) if seed in recorded}
    check["arch_study_json_threads"] = ours.get("threads")
    inits = work / "inits.json"
    check["saelens_inits_recovered"] = json.loads(inits.read_text()) if inits.exists() else None
    result = {"saelens": manifest, "dlmscope_commit": head, "dlmscope_uncommitted": dirty,
              "arch_study_json_commit": json_commit,
              "our_seeds": seeds, "data_identical_to_arch_study": same,
              "loader_vs_saelens_own_outputs_max_abs_diff": loader_gap, "checks": check,
              "interval": "min–max over SAE init seeds (the data stream shared)",
              "summary": {"dlmscope": study.summarise(mine), "saelens": peers},
              "per_seed": {"dlmscope": {str(s): m for s, m in zip(seeds, mine)},
                           "saelens": {str(s): per_seed[s] for s in sorted(per_seed)}}}
    (out / "arch_study_peers.json").write_text(json.dumps(result, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    (out / "arch_study_peers.md").write_text(report(result, study) + "\n")
    print(report(result, study))
    return 0


def report(result: dict, study) -> str:
    ours, peers = result["summary"]["dlmscope"], result["summary"]["saelens"]
    man, check = result["saelens"], result["checks"]
    fmt = lambda c, p=3: f"{c['mean']:.{p}f} [{c['low']:.{p}f}–{c['high']:.{p}f}]"  # noqa: E731
    front = pareto({("dlmscope", k): (v["l0"]["mean"], v["fve"]["mean"]) for k, v in ours.items()}
                   | {("SAELens", k): (v["l0"]["mean"], v["fve"]["mean"]) for k, v in peers.items()})
    order = sorted(ours, key=lambda k: (ours[k]["arch"], ours[k]["l0"]["mean"]))
    lines = ["| SAE | trainer | mean L0 | held-out FVE | planted directions recovered | dead |",
             "|---|---|---|---|---|---|"]
    for name in order:
        for lib, table in (("dlmscope", ours), ("SAELens", peers)):
            r = table[name]
            star = " ★" if (lib, name) in front else ""
            lines.append(f"| {name} | {lib} | {fmt(r['l0'], 2)} | {fmt(r['fve'])}{star} | {fmt(r['recovered'], 2)} | "
                         f"{fmt(r['dead'], 2)} |")
    sign = lambda x, p: f"{x:+.{p}f}"  # noqa: E731
    apart = lambda a, b: ("SAELens" if a["low"] > b["high"] else "dlmscope" if b["low"] > a["high"]  # noqa: E731
                          else "overlap")
    deltas = ["| SAE | ΔL0 | ΔFVE | FVE ranges | Δrecovered | recovery ranges |", "|---|---|---|---|---|---|"]
    for name in order:
        o, q = ours[name], peers[name]
        deltas.append(f"| {name} | {sign(q['l0']['mean'] - o['l0']['mean'], 2)} | "
                      f"{sign(q['fve']['mean'] - o['fve']['mean'], 3)} | {apart(q['fve'], o['fve'])} | "
                      f"{sign(q['recovered']['mean'] - o['recovered']['mean'], 2)} | "
                      f"{apart(q['recovered'], o['recovered'])} |")
    tc, gap, d = man["trainer_cfg"], result["loader_vs_saelens_own_outputs_max_abs_diff"], man["sae_defaults"]
    init_most = lambda inits: max(max(v.values()) for v in inits.values())  # noqa: E731
    inits_peer = check["saelens_inits_recovered"]
    init_line = (" No SAE starts at the answer: the share of planted directions an initial decoder already matches "
                 f"is at most {init_most(check['inits_recovered']):.2f} for ours (`check_init` refuses more than 0)"
                 + ("" if inits_peer is None else f" and {init_most(inits_peer):.2f} for SAELens's") + ".")
    rerun = check["rerun_vs_arch_study_json"]
    worst = max(rerun.values(), key=lambda g: g["max_abs_diff"]) if rerun else None
    threads = check.get("arch_study_json_threads")
    rerun_line = ("" if worst is None else
                  f" Our seeds {', '.join(rerun)} differ from arch_study.json (committed at "
                  f"`{result['arch_study_json_commit'][:7]}`"
                  + (f", written with {threads} thread{'s' if threads != 1 else ''}" if threads else "")
                  + ") by " + ("0" if worst["max_abs_diff"] == 0 else
                               f"at most {worst['max_abs_diff']:.1e} ({worst['figure']} of {worst['sae']}: "
                               f"{worst['values'][0]:.4f} here, {worst['values'][1]:.4f} there)") + ".")
    dirty = result["dlmscope_uncommitted"]
    at = f"`{result['dlmscope_commit'][:7]}`" + (f" with uncommitted changes to {len(dirty)} files of dlmscope/, "
                                                  "listed in the json" if dirty else "")
    text = [
        "# SAE architectures on planted data: ours beside SAELens's trainer", "",
        f"Written by `docs/arch_study_peers.py` (SAELens {man['versions']['sae_lens']}, torch "
        f"{man['versions']['torch']}, {man['threads']} thread; dlmscope at {at}). The data, budget and measurement are "
        "those of [`arch_study.md`](arch_study.md): the same planted problem, the same 800 batches × 512 rows (the "
        "SHA-256 of the batches SAELens's trainer consumed equals that of arch_study.py's stream), the same 8192 "
        "held-out rows, n = 512, k ∈ {3, 6, 12}, JumpReLU λ ∈ {0.1, 0.3, 1, 3}. Each cell: mean [min–max] over 3 "
        f"init seeds: SAELens {', '.join(map(str, man['seeds']))}; ours {', '.join(map(str, result['our_seeds']))} "
        "(arch_study.py's), trained here.", "",
        "**Code paths.** dlmscope rows: `arch_study.train_seed` (`dlmscope.train.trainer.Trainer`, the library's "
        "recipe, unchanged). SAELens rows: SAELens's own training SAEs (`TopKTrainingSAE`, `BatchTopKTrainingSAE`, "
        "`MatryoshkaBatchTopKTrainingSAE`, `JumpReLUTrainingSAE`), each trained alone by SAELens's own "
        "`SAETrainer(...).fit()` on an in-memory iterator over the batches and saved by its `save_inference_model` "
        "(BatchTopK and Matryoshka become the fixed-threshold JumpReLU that SAELens saves), then loaded by "
        "`dlmscope.sae.load`. Both sides are measured by one function (`measure` in the script, arch_study's "
        "measurement): FVE, mean L0 and dead latents on the held-out rows under each SAE's inference rule, and "
        "the share of the 256 planted directions that some decoder row matches at cosine > 0.9.", "",
        f"**SAELens recipe.** Set to arch_study's budget: lr {tc['lr']:g}, {tc['lr_warm_up_steps']} warmup steps, "
        f"constant, linear decay to 0 over the last {tc['lr_decay_steps']} steps; dead after "
        f"{tc['dead_feature_window']} steps without firing (SAELens's default, 1000 steps, is longer than the run, "
        f"so AuxK would never start); activations scaled to E|x|² = d (`expected_average_only_in`, estimated on the "
        f"same first {tc['n_batches_for_norm_estimate']} batches that ours uses for its norm factor); Matryoshka widths "
        f"64, 128, 256, 512. The rest is SAELens's default: AuxK coefficient {d['topk']['aux_loss_coefficient']:g}, "
        f"`rescale_acts_by_decoder_norm` {d['topk']['rescale_acts_by_decoder_norm']}, decoder init norm "
        f"{d['topk']['decoder_init_norm']:g}, BatchTopK threshold rate {d['batchtopk']['topk_threshold_lr']:g} "
        f"(our β = {study.BETA:g} is the same rate), JumpReLU θ₀ {d['jumprelu']['jumprelu_init_threshold']:g} and "
        f"bandwidth {d['jumprelu']['jumprelu_bandwidth']:g} (ours: {study.THETA0:g} and {study.BANDWIDTH:g} on "
        f"unit-variance activations), `{d['jumprelu']['jumprelu_sparsity_loss_mode']}` L0 loss, grad-norm clip 1.", "",
        f"**Checks.** SAELens's own inference SAE (`SAE.load_from_disk`) and our loader agree on every file to "
        f"{gap['fve']:.1e} in FVE and {gap['l0']:.1e} in mean L0. `measure` on our SAEs gives `train_seed`'s own "
        f"figures to {check['max_abs_diff_measure_vs_train_seed']:.1e}." + rerun_line + init_line, "",
        "★: on the FVE–L0 Pareto front of all 26 rows (no other row has both lower-or-equal mean L0 and "
        "higher-or-equal mean FVE).", ""] + lines + [
        "", "SAELens minus ours (means); \"ranges\": which side's min–max lies wholly above the other's, or overlap.",
        ""] + deltas
    return "\n".join(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=("inits", "train", "eval"))
    p.add_argument("--work", default=str(DEFAULT_WORK), help=f"the SAELens checkpoints (default {DEFAULT_WORK})")
    p.add_argument("--out", default=str(HERE), help="eval: where arch_study.json is and the report goes")
    p.add_argument("--seeds", default="0,1,2", help="train: init seeds")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    if a.step == "inits":
        print(json.dumps(peer_inits(Path(a.work), [int(s) for s in a.seeds.split(",")]), indent=1))
        return 0
    if a.step == "train":
        return train(Path(a.work), [int(s) for s in a.seeds.split(",")])
    return evaluate(Path(a.work), Path(a.out))


if __name__ == "__main__":
    raise SystemExit(main())
