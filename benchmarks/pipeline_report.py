#!/usr/bin/env python
"""End-to-end harvest + train throughput on the embedded DLM: dlmscope vs a plain-PyTorch pipeline, one run.

    python benchmarks/pipeline_report.py [--tokens N] [--quick] [--variants dlmscope,plain,plain_one_forward]
                                         [--out benchmarks/results]

The job (both pipelines do exactly this): harvest resid_post of layers 1 and 3 of the embedded LLaDA-format DLM
(``dlmscope/world/assets/models/dlm``: 8 blocks, d_model 128) under the ``mask`` policy (REFERENCE §3: per LM
batch ``p ~ U[0.05, 0.5]``, every non-pad position except 0 masked with probability ``p``, keep the masked
positions), and train a k sweep of Top-K SAEs (n=1024, k = 8, 16, 32, batch 1024 tokens) per layer on the same
number of kept training tokens per layer. Same recipe on both sides: one scalar norm factor from the first
``norm_batches`` batches, ``b_dec`` = geometric median of the first batch, lr 3e-4 with linear warmup + final
linear decay, W_dec gradient projected off the decoder rows, grad-norm clip 1.0 per SAE, Adam, decoder rows
renormalised; AuxK never switches on in a run this short (``dead_tokens`` = 10M > tokens seen) on either side.

Variants:
  dlmscope           ``ActivationStream`` (one forward truncated after the deepest hooked layer harvests both
                     layers; an activation cache on disk so the model runs once, as ``dlmscope train`` does) →
                     ``stream.for_layer(L)`` → ``Trainer([TopKSAE…])`` (fused cpu-backend ops, grouped encoders).
  plain              the paper's code's way: one run per layer, each a full forward of the whole model
                     (``adapter.model(...)``, LM head included) with a ``register_forward_hook`` on the hooked
                     block, a shuffle buffer, and per SAE a dense plain-PyTorch step (``reference.topk_encode``:
                     B×n pre-activations + ``torch.topk``; ``reference.sparse_decode``: scatter into B×n + dense
                     matmul; MSE; autograd; ``torch.optim.Adam`` (foreach) + LambdaLR).
  plain_one_forward  the stronger baseline: the same plain pipeline, but ONE full forward with hooks on both
                     layers feeds both layers' SAEs (no re-run per layer).

tokens/s = kept training tokens per layer × layers / wall seconds, timed from the first forward to the trained
SAEs (model loading, tokenization and the held-out evaluation are outside the timer; every variant first does an
untimed warm-up run on 2 batches). Held-out FVE of every SAE (``dlmscope.analysis.splice.evaluate_sae`` on the same
held-out activations for every variant) is reported so the speed comparison is between equally good SAEs.

Writes ``<out>/cpu-pipeline-world-dlm.json`` and ``.md`` (``--quick``: ``cpu-pipeline-world-dlm-quick.*``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)  # the repo's dlmscope, also when it is not installed

import torch  # noqa: E402

from dlmscope.util import atomic  # noqa: E402

from dlmscope import models, reference
from dlmscope.train.geometric_median import geometric_median  # noqa: E402
from dlmscope.data.noise import T_MAX, T_MIN, corrupt, draw_t  # noqa: E402
from dlmscope.jobs.train import SweepSpec, train_sweep  # noqa: E402
from dlmscope.jobs.train import heldout_activations as pipeline_heldout  # noqa: E402
from dlmscope.jobs.train import make_saes as make_layer_saes  # noqa: E402
from dlmscope.sae.topk import TopKSAE  # noqa: E402
from dlmscope.train.schedule import lr_factor  # noqa: E402
from dlmscope.data.shuffle import shuffle_batches  # noqa: E402
from dlmscope.analysis.splice import evaluate_sae  # noqa: E402
from dlmscope.train.trainer import TrainConfig  # noqa: E402
from dlmscope.train.log import LogConfig  # noqa: E402
from dlmscope.data.text import world_batches  # noqa: E402

MODEL_DIR = os.path.join(ROOT, "dlmscope", "world", "assets", "models", "dlm")
VARIANTS = ("dlmscope", "plain", "plain_one_forward")
NAMES = {
    "dlmscope": "dlmscope: ActivationStream (one truncated forward, disk cache) → Trainer (fused ops, grouped)",
    "plain": "plain PyTorch, paper's way: full forward + hook, model re-run per layer, dense Top-K",
    "plain_one_forward": "plain PyTorch, one full forward + hooks on all layers, dense Top-K",
}


@dataclasses.dataclass
class Settings:
    layers: tuple[int, ...] = (1, 3)
    ks: tuple[int, ...] = (8, 16, 32)
    n: int = 1024
    batch_size: int = 1024
    #: kept training tokens per layer (a multiple of batch_size: every variant trains tokens // batch_size steps)
    tokens: int = 512 * 1024
    seq_len: int = 64
    lm_batch: int = 32
    sentences: int = 250_000
    buffer_tokens: int = 65_536
    lr: float = 3e-4
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    norm_batches: int = 10
    t_min: float = T_MIN
    t_max: float = T_MAX
    eval_tokens: int = 20_480
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def check(self) -> None:
        if self.tokens < self.batch_size or self.tokens % self.batch_size:
            raise ValueError(f"tokens ({self.tokens}) must be a positive multiple of batch_size ({self.batch_size})")


# ---- shared setup (untimed) -------------------------------------------------------------------------------


def load_adapter():
    return models.load(MODEL_DIR)


def token_batches(adapter, s: Settings, heldout: bool = False) -> list[torch.Tensor]:
    """LM batches ``[lm_batch, seq_len]`` of the world corpus, as ``dlmscope train --corpus world`` reads them."""
    train, held = world_batches(adapter.tokenizer, s.sentences, s.seq_len, s.lm_batch, s.seed)
    return held if heldout else train


def sweep_spec(s: Settings) -> SweepSpec:
    """The harvest-and-train settings every variant runs (mask policy, both layers, the k sweep)."""
    return SweepSpec(layers=s.layers, ks=s.ks, n_latents=s.n, policy="mask", tokens=s.tokens,
                     batch_size=s.batch_size, buffer_tokens=s.buffer_tokens, t_min=s.t_min, t_max=s.t_max,
                     seed=s.seed)


def make_saes(adapter, s: Settings) -> dict[int, list[TopKSAE]]:
    """Identically initialised SAEs for every variant (``pipeline.make_saes``: seeded per layer)."""
    return {L: make_layer_saes(adapter.d_model, sweep_spec(s), L) for L in s.layers}


# ---- dlmscope pipeline ------------------------------------------------------------------------------------


def run_dlmscope(adapter, batches: list[torch.Tensor], s: Settings, saes: dict[int, list[TopKSAE]],
                 workdir: str) -> dict:
    """``dlmscope train``'s pipeline (``pipeline.train_sweep``): one harvest cached on disk for all layers, one
    grouped Trainer per layer."""
    train = TrainConfig(lr=s.lr, warmup_steps=s.warmup_steps, decay_fraction=s.decay_fraction,
                        grad_clip=s.grad_clip, norm_batches=s.norm_batches)
    t0 = time.perf_counter()
    trained = train_sweep(adapter, batches, sweep_spec(s), train, cache_dir=os.path.join(workdir, "activation_cache"),
                          saes=saes, log=LogConfig(log_every=0, progress=False))
    for L, group in trained.items():
        if any(sae.cfg.meta["trained_tokens"] != s.tokens for sae in group):
            raise RuntimeError(f"dlmscope layer {L} trained on {group[0].cfg.meta['trained_tokens']} tokens, "
                               f"not {s.tokens}")
    return {"per_layer_s": {"+".join(map(str, s.layers)): time.perf_counter() - t0}}


# ---- plain-PyTorch pipeline -------------------------------------------------------------------------------


def plain_corrupt(ids: torch.Tensor, mask_id: int, s: Settings, gen: torch.Generator):
    """REFERENCE §3: p ~ U[t_min, t_max] per batch, mask positions except 0 w.p. p (the world rows have no
    padding). ``noise.corrupt`` is plain torch (no fused op); drawing p first, as ``harvest`` does, keeps
    the same positions on both sides."""
    return corrupt(ids, None, mask_id, draw_t(s.t_min, s.t_max, gen), gen)


@torch.no_grad()
def plain_harvest(adapter, batches: Iterable[torch.Tensor], layers: Iterable[int], s: Settings
                  ) -> Iterator[dict[int, torch.Tensor]]:
    """Kept (masked-position) activations ``{layer: [m, d]}`` per LM batch, from FULL forwards with hooks."""
    layers = list(layers)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(L):
        def hook(_module, _args, output):
            captured[L] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [adapter.hook_module(L).register_forward_hook(make_hook(L)) for L in layers]
    gen = torch.Generator().manual_seed(s.seed)
    mask_id = adapter.mask_token_id
    produced = 0
    try:
        for ids in batches:
            noisy, keep = plain_corrupt(ids, mask_id, s, gen)
            adapter.model(input_ids=noisy, use_cache=False)  # every block, final norm and LM head
            flat = keep.reshape(-1)
            chunk = {L: captured[L].reshape(-1, captured[L].shape[-1])[flat] for L in layers}
            captured.clear()
            m = int(flat.sum())
            if produced + m >= s.tokens:
                yield {L: v[: s.tokens - produced] for L, v in chunk.items()}
                return
            produced += m
            yield chunk
    finally:
        for h in handles:
            h.remove()
    raise ValueError(f"the corpus ran out after {produced} kept tokens (< {s.tokens}); raise --sentences")


def plain_shuffle(chunks: Iterable[dict[int, torch.Tensor]], s: Settings) -> Iterator[dict[int, torch.Tensor]]:
    """The shuffle buffer: ``shuffle_buffer.shuffle_batches`` is plain torch (cat / randperm / slicing), so the
    baseline uses it as is (an ad-hoc buffer that re-concatenates per chunk would only handicap the baseline)."""
    return shuffle_batches(chunks, s.batch_size, s.buffer_tokens, seed=s.seed + 1)


class PlainSweep:
    """The k sweep of one layer trained with plain PyTorch (dense Top-K), the paper's recipe."""

    def __init__(self, saes: list[TopKSAE], s: Settings):
        self.saes, self.s = saes, s
        self.opts = []
        for sae in saes:
            opt = torch.optim.Adam([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], lr=s.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: lr_factor(step, s.steps, s.warmup_steps, s.decay_fraction))
            self.opts.append((opt, sched))
        self.pending: list[torch.Tensor] = []
        self.norm: float | None = None
        self.tokens_seen = 0

    def push(self, x: torch.Tensor) -> None:
        if self.norm is None:
            self.pending.append(x)
            if len(self.pending) >= min(self.s.norm_batches, self.s.steps):
                self._start()
            return
        self._step(x)

    def _start(self) -> None:
        self.norm = float(torch.cat(self.pending).double().pow(2).sum(-1).mean().sqrt())
        with torch.no_grad():
            median = geometric_median(self.pending[0] / self.norm)
            for sae in self.saes:
                sae.b_dec.copy_(median)
        pending, self.pending = self.pending, []
        for x in pending:
            self._step(x)

    def _step(self, x: torch.Tensor) -> None:
        x = x / self.norm
        for sae, (opt, sched) in zip(self.saes, self.opts):
            reference.dense_train_step(sae, opt, x, self.s.grad_clip)
            sched.step()
        self.tokens_seen += x.shape[0]

    @torch.no_grad()
    def finish(self) -> None:
        if self.norm is None:
            self._start()
        for sae in self.saes:  # fold the norm factor into the biases: the SAEs run on raw activations
            sae.b_enc.mul_(self.norm)
            sae.b_dec.mul_(self.norm)


def run_plain(adapter, batches: list[torch.Tensor], s: Settings, saes: dict[int, list[TopKSAE]],
              one_forward: bool = False) -> dict:
    """The plain-PyTorch pipeline: per layer a full-forward harvest (or one for all layers) + dense training."""
    layer_s = {}
    groups = [list(s.layers)] if one_forward else [[L] for L in s.layers]
    for layers in groups:
        t0 = time.perf_counter()
        sweeps = {L: PlainSweep(saes[L], s) for L in layers}
        for step, batch in enumerate(plain_shuffle(plain_harvest(adapter, batches, layers, s), s)):
            if step == s.steps:
                break
            for L in layers:
                sweeps[L].push(batch[L])
        for L, sweep in sweeps.items():
            sweep.finish()
            if sweep.tokens_seen != s.tokens:
                raise RuntimeError(f"plain layer {L} trained on {sweep.tokens_seen} tokens, not {s.tokens}")
        layer_s["+".join(map(str, layers))] = time.perf_counter() - t0
    return {"per_layer_s": layer_s}


RUNNERS = {
    "dlmscope": lambda adapter, batches, s, saes, workdir: run_dlmscope(adapter, batches, s, saes, workdir),
    "plain": lambda adapter, batches, s, saes, workdir: run_plain(adapter, batches, s, saes, one_forward=False),
    "plain_one_forward": lambda adapter, batches, s, saes, workdir: run_plain(adapter, batches, s, saes,
                                                                              one_forward=True),
}


# ---- evaluation -------------------------------------------------------------------------------------------


def heldout_activations(adapter, s: Settings) -> dict[int, torch.Tensor]:
    """Held-out masked-position activations ``{layer: [N, d]}`` (the held-out side of the world split)."""
    return pipeline_heldout(adapter, token_batches(adapter, s, heldout=True), sweep_spec(s), tokens=s.eval_tokens)


def heldout_metrics(saes: dict[int, list[TopKSAE]], held: dict[int, torch.Tensor]) -> dict:
    return {str(L): {str(sae.k): {key: round(float(v), 5) for key, v in evaluate_sae(sae, held[L]).items()
                                  if key in ("fve", "l0")} for sae in group}
            for L, group in saes.items()}


# ---- report -----------------------------------------------------------------------------------------------


def run_variant(name: str, adapter, batches, s: Settings) -> tuple[float, dict, dict]:
    """(wall seconds, per-layer info, trained SAEs) of one timed run of a variant."""
    saes = make_saes(adapter, s)
    workdir = tempfile.mkdtemp(prefix=f"dlmscope-pipeline-{name}-")
    try:
        t0 = time.perf_counter()
        info = RUNNERS[name](adapter, batches, s, saes, workdir)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return wall, info, saes


def _foreign(rows: dict) -> str:
    vals = [r["foreign_cpu_cores"] for r in rows.values() if r.get("foreign_cpu_cores") is not None]
    return f"≤ {max(vals):.2f}" if vals else "?"


def _truncation_note(s: dict) -> str:
    deepest, n = max(s["layers"]), s.get("num_layers", 4)
    saved = "only the final norm + LM head" if deepest == n - 1 else \
        f"blocks {deepest + 1}–{n - 1}, the final norm and the LM head"
    return (f"The deepest hooked layer is {deepest} of blocks 0–{n - 1}, so truncation saves {saved}; the rest of "
            f"dlmscope's gain comes from one forward for all layers (activation cache; layer {deepest}'s phase "
            "reads it back) and the fused SAE training.")


def render_markdown(result: dict) -> str:
    s, m, rows = result["settings"], result["machine"], result["variants"]
    base = rows.get("plain")
    lines = [
        f"#### Harvest + train, embedded DLM (LLaDA format, {s.get('num_layers', 4)} blocks, d={s.get('d_model', 128)})"
        f" — layers {s['layers']}, mask policy, "
        f"n={s['n']}, k={s['ks']}, B={s['batch_size']}, {s['tokens']:,} kept tokens per layer, fp32, CPU", "",
        f"{m['cpu_model']}; torch {m['torch']}; {m['cpu_count']} CPU cores ({m['torch_threads']} torch threads); "
        f"`uptime` at start: {m.get('uptime')}; other processes kept {_foreign(rows)} cores busy on average "
        "while timing; "
        f"dlmscope {m['git_commit']}{'+dirty' if m['git_dirty'] else ''}; {m['date']}. One run per variant "
        "(after an untimed 2-batch warm-up); tokens/s = kept tokens per layer × layers / wall seconds.", "",
        "| pipeline | wall | tokens/s | vs plain (paper's way) | held-out FVE k=" + "/".join(map(str, s["ks"])) +
        " (layer " + ", layer ".join(map(str, s["layers"])) + ") |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        fves = "; ".join("/".join(f"{r['heldout'][str(L)][str(k)]['fve']:.3f}" for k in s["ks"])
                         for L in s["layers"])
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base else "—"
        lines.append(f"| {NAMES[name]} | {r['wall_s']:.1f} s | {r['tokens_per_s']:,.0f} | {vs} | {fves} |")
    lines.append("")
    ratios = result["ratios"]
    parts = []
    if "dlmscope_vs_plain" in ratios:
        parts.append(f"dlmscope vs the paper's plain pipeline: **{ratios['dlmscope_vs_plain']:.2f}×**")
    if "dlmscope_vs_plain_one_forward" in ratios:
        parts.append(f"vs plain with one shared forward: **{ratios['dlmscope_vs_plain_one_forward']:.2f}×**")
    if parts:
        lines.append("; ".join(parts) + f". Largest held-out FVE gap between dlmscope and a plain variant: "
                     f"{result['max_fve_gap']:.4f}.")
        lines.append("")
    lines += [
        "Baseline choice: `plain` is what the paper's code does — it trains one layer per run, so each layer's run "
        "re-runs the full model (all blocks + LM head) with a forward hook on that block; `plain_one_forward` is "
        "the stronger plain baseline (one full forward with hooks on both layers feeds both sweeps). Both plain "
        "variants use the same masking (same seed, same kept positions), the same shuffle buffer (`shuffle_buffer.shuffle_batches`, plain torch), and per SAE "
        "`reference.topk_encode` (dense B×n pre-activations + `torch.topk`) + `reference.sparse_decode` (scatter "
        "into B×n + matmul), MSE, autograd, W_dec-gradient projection, grad clip, `torch.optim.Adam` + LambdaLR, "
        "decoder renorm. Same init, norm factor, geometric-median `b_dec`, lr schedule and step count as dlmscope's "
        "Trainer. Held-out FVE: `evaluate_sae` on the same held-out masked-position activations for every variant. "
        + _truncation_note(s) +
        " Wall time includes writing/reading the cache (tmp dir on local disk).",
        "",
        "Per-phase wall seconds: " + "; ".join(
            f"{name} " + ", ".join(f"layer {L}: {t:.1f} s" for L, t in r["per_layer_s"].items())
            for name, r in rows.items()) + ". Run: `PYTHONPATH=. python benchmarks/pipeline_report.py`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="kept training tokens per layer")
    parser.add_argument("--quick", action="store_true", help="8 batches per layer (seconds)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in RUNNERS]
    if bad:
        parser.error(f"unknown variants {bad}; choose from {list(RUNNERS)}")
    s = Settings()
    if args.quick:
        s = dataclasses.replace(s, tokens=8 * s.batch_size, sentences=20_000, eval_tokens=4096)
    if args.tokens is not None:
        s = dataclasses.replace(s, tokens=args.tokens)
    s.check()

    import report
    from conftest import _cpu_sample, _foreign_cores

    machine = report.machine_info("cpu")
    try:
        machine["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        machine["uptime"] = None
    adapter = load_adapter()
    batches = token_batches(adapter, s)
    held = heldout_activations(adapter, s)
    print(f"{len(batches)} LM batches of {s.lm_batch}×{s.seq_len} tokens available; {s.tokens} kept tokens per "
          f"layer, layers {list(s.layers)}, ks {list(s.ks)}, n={s.n}, B={s.batch_size}; "
          f"{held[s.layers[0]].shape[0]} held-out tokens per layer", flush=True)
    warm = dataclasses.replace(s, tokens=2 * s.batch_size, norm_batches=1)
    for name in variants:
        run_variant(name, adapter, batches, warm)

    rows = {}
    for name in variants:
        before = _cpu_sample()
        wall, info, saes = run_variant(name, adapter, batches, s)
        foreign = _foreign_cores(before, _cpu_sample())
        rows[name] = {"wall_s": round(wall, 3), "tokens_per_s": s.tokens * len(s.layers) / wall,
                      "per_layer_s": {str(k): round(v, 3) for k, v in info["per_layer_s"].items()},
                      "foreign_cpu_cores": round(foreign, 2) if foreign is not None else None,
                      "heldout": heldout_metrics(saes, held)}
        fv = "; ".join(f"L{L}: " + " ".join(f"k{k}={v['fve']:.4f}" for k, v in d.items())
                       for L, d in rows[name]["heldout"].items())
        print(f"{name}: {wall:.1f} s, {rows[name]['tokens_per_s']:,.0f} tokens/s; held-out FVE {fv}", flush=True)
    machine["loadavg_1m_end"] = round(os.getloadavg()[0], 2)

    ratios = {}
    if "dlmscope" in rows:
        for other in ("plain", "plain_one_forward"):
            if other in rows:
                ratios[f"dlmscope_vs_{other}"] = rows["dlmscope"]["tokens_per_s"] / rows[other]["tokens_per_s"]
    gaps = [abs(rows["dlmscope"]["heldout"][L][k]["fve"] - rows[o]["heldout"][L][k]["fve"])
            for o in rows if o != "dlmscope" and "dlmscope" in rows
            for L in rows[o]["heldout"] for k in rows[o]["heldout"][L]]
    settings = dataclasses.asdict(s)
    settings.update(steps=s.steps, model=os.path.relpath(MODEL_DIR, ROOT), policy="mask", hook="resid_post",
                    dtype="float32", device="cpu", num_layers=adapter.num_layers, d_model=adapter.d_model)
    result = {"settings": settings, "variants": rows, "ratios": ratios,
              "max_fve_gap": max(gaps) if gaps else None, "machine": machine}
    tag = "cpu-pipeline-world-dlm" + ("-quick" if args.quick else "")
    os.makedirs(args.out, exist_ok=True)
    atomic.write_json(os.path.join(args.out, f"{tag}.json"), result)
    md = render_markdown(result)
    atomic.write_text(os.path.join(args.out, f"{tag}.md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
