"""The harvest + train job both pipelines run on the embedded DLM, and dlmscope's pipeline for it (the plain-PyTorch
pipelines: :func:`baselines.run_plain`). Timed by ``bench_harvest_train.py`` (small, pytest-benchmark) and by
``python benchmarks/report.py pipeline`` (one run at full size, the table of docs/benchmarks.md).

The job (both pipelines do exactly this): harvest resid_post of layers 1 and 3 of the embedded LLaDA-format DLM
(``dlmscope/world/assets/models/dlm``: 8 blocks, d_model 128) under the ``mask`` policy (docs/reference.md §3: per LM
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

Held-out FVE of every SAE (``evaluate_sae`` on the same held-out activations for every variant) is reported so the
speed comparison is between equally good SAEs.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

import torch

import baselines
from dlmscope import models
from dlmscope.data.noise import T_MAX, T_MIN
from dlmscope.jobs.train import SweepSpec, train_sweep
from dlmscope.jobs.train import heldout_activations as pipeline_heldout
from dlmscope.jobs.train import make_saes as make_layer_saes
from dlmscope.sae.metrics import evaluate_sae
from dlmscope.sae.topk import TopKSAE
from dlmscope.train.log import LogConfig
from dlmscope.train.trainer import TrainConfig
from dlmscope.world import world_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "dlmscope", "world", "assets", "models", "dlm")
VARIANTS = ("dlmscope", "plain", "plain_one_forward")


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
    """Identically initialised SAEs for every variant (``dlmscope.jobs.train.make_saes``: seeded per layer)."""
    return {L: make_layer_saes(adapter.d_model, sweep_spec(s), L) for L in s.layers}


# ---- dlmscope pipeline ------------------------------------------------------------------------------------


def run_dlmscope(adapter, batches: list[torch.Tensor], s: Settings, saes: dict[int, list[TopKSAE]],
                 workdir: str) -> dict:
    """``dlmscope train``'s pipeline (``dlmscope.jobs.train.train_sweep``): one harvest cached on disk for all
    layers, one grouped Trainer per layer."""
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


RUNNERS = {
    "dlmscope": lambda adapter, batches, s, saes, workdir: run_dlmscope(adapter, batches, s, saes, workdir),
    "plain": lambda adapter, batches, s, saes, workdir: baselines.run_plain(adapter, batches, s, saes,
                                                                             one_forward=False),
    "plain_one_forward": lambda adapter, batches, s, saes, workdir: baselines.run_plain(adapter, batches, s, saes,
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


# ---- one timed run -----------------------------------------------------------------------------------------------


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
