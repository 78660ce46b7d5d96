"""The demo's settings (:class:`DemoConfig`) and the (model, policy) runs it trains SAEs for."""
from __future__ import annotations

import dataclasses

from dlmscope.train.trainer import TrainConfig
from dlmscope.world import LM_BATCH, SAE_K, SAE_LATENTS, SAE_TRAIN, SEQ_LEN

__all__ = ["DemoConfig", "RUNS", "RUN_LABELS", "AR_TWINS"]

#: (model, harvest policy) pairs the demo trains SAEs for.
RUNS = (("dlm", "mask"), ("dlm", "unmask"), ("ar", "clean"), ("ar_matched", "clean"))
#: each run's key in ``results["runs"]`` -> its label in tables and plots
RUN_LABELS = {"dlm/mask": "DLM Mask-SAE", "dlm/unmask": "DLM Unmask-SAE", "ar/clean": "AR init twin SAE",
              "ar_matched/clean": "matched AR twin SAE"}
#: the AR twins every DLM-vs-AR line compares with (run key -> which pair it is; world.json["models"]["training"])
AR_TWINS = {"ar/clean": "AR init twin: 1200 steps, the DLM's initialisation (the DLM has 5500 more steps)",
            "ar_matched/clean": "budget-matched AR twin: the init twin + the DLM's own 4500 + 1000 steps on the "
                                "DLM's data (6700 steps each)"}


@dataclasses.dataclass
class DemoConfig:
    """Settings of the demo (defaults: the full demo, ≈ 12 min on 2 CPU cores)."""

    layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)  # every block of the world's models
    ks: tuple[int, ...] = (4, 8, 16, 32)
    n_latents: int = SAE_LATENTS
    #: kept training activations per (model, policy, layer)
    train_tokens: int = 200_000
    #: held-out activations per (model, policy, layer) for FVE / L0 / dead
    eval_tokens: int = 30_000
    #: held-out LM batches per round of the ΔLM losses (the same corruption for every SAE and layer); an SAE gets
    #: more rounds, up to ``delta_max_batches``, until the SE of each of its ΔLM is below ``delta_rel_se`` · |Δ|
    delta_batches: int = 12
    delta_max_batches: int = 48
    delta_rel_se: float = 0.1
    #: held-out LM batches for concept scoring: the best latent is chosen on the even ones, scored on the odd ones
    concept_batches: int = 16
    #: masking rate of the ``masked`` concept view
    concept_t: float = 0.3
    #: the k shown in the per-layer ΔLM and concept plots, and the k trained with several SAE seeds
    k_ref: int = SAE_K
    #: SAE init seeds at ``k_ref`` for every run and layer (``results["sae_seeds"]``): the k sweep's SAEs start from
    #: ``seed``; ``sae_seeds - 1`` more SAEs at ``k_ref`` only start from ``seed + 1``, ``seed + 2``, ... and train
    #: in the same grouped trainer on the same harvest (the data order and corruption are shared; only the
    #: initialisation differs, so the spread over seeds is the spread of the initialisation). The other k have
    #: one seed: a cheaper grid, the FVE gaps and concept margins the findings state with a spread are at k_ref.
    sae_seeds: int = 3
    sentences: int = 100_000
    seq_len: int = SEQ_LEN
    lm_batch: int = LM_BATCH
    sae_batch: int = 1024
    #: the SAE training recipe (the world's, :data:`dlmscope.world.SAE_TRAIN`)
    lr: float = SAE_TRAIN["lr"]
    warmup_steps: int = SAE_TRAIN["warmup_steps"]
    dead_tokens: int = SAE_TRAIN["dead_tokens"]
    norm_batches: int = SAE_TRAIN["norm_batches"]
    seed: int = 0
    #: blocks where the demo steers (each must be in ``layers``; empty: no steering section)
    steer_layers: tuple[int, ...] = (1, 4, 6)
    #: the DLM's α values; the AR twin runs at the same ones and at the paper's 1.2
    steer_alphas: tuple[float, ...] = (2.0, 4.0)
    steer_prompts: int = 24
    #: generated tokens per prompt (the DLM denoises them in as many steps)
    steer_gen: int = 8

    #: Mask-SAE layers replaying the decoding orders (empty: no order section); tasks per order-sensitive kind
    order_layers: tuple[int, ...] = (2, 4, 6)
    order_tasks: int = 100
    order_seeds: tuple[int, ...] = (0, 1, 2)
    #: layers of the base → instruct transfer section (empty: none) and its budget
    transfer_layers: tuple[int, ...] = (2, 5)
    transfer_tokens: int = 120_000
    transfer_eval_tokens: int = 10_000
    transfer_delta_batches: int = 6
    #: seed replicates of the transfer section's base, second-base and instruct SAEs (the FVE ratio over them)
    transfer_seeds: int = 3
    #: layers of the crosscoder diff (base DLM vs instruct twin, the placebo twin as the count null; empty: none),
    #: its harvest policy (mask: the positions the instruct twin's SFT loss acts on) and budget
    crosscoder_layers: tuple[int, ...] = (5, 7)
    crosscoder_policy: str = "mask"
    crosscoder_tokens: int = 120_000
    crosscoder_eval_tokens: int = 10_000
    crosscoder_epochs: int = 2
    crosscoder_seeds: int = 3

    def __post_init__(self):
        self.layers = tuple(sorted({int(x) for x in self.layers}))
        self.ks = tuple(sorted(int(k) for k in self.ks))
        if not self.layers or not self.ks:
            raise ValueError("DemoConfig needs at least one layer and one k")
        if self.k_ref not in self.ks:
            raise ValueError(f"k_ref={self.k_ref} must be one of ks={self.ks}")
        if self.sae_seeds < 1:
            raise ValueError(f"sae_seeds must be >= 1 (the k sweep's own seed), got {self.sae_seeds}")
        if self.delta_max_batches < self.delta_batches:
            raise ValueError(f"delta_max_batches={self.delta_max_batches} must be >= "
                             f"delta_batches={self.delta_batches}")
        if self.concept_batches < 2:
            raise ValueError("concept_batches must be >= 2 (one half chooses the best latent, the other scores it)")
        self.steer_alphas = tuple(sorted(float(a) for a in self.steer_alphas))
        for name in ("steer_layers", "order_layers"):
            setattr(self, name, tuple(sorted({int(x) for x in getattr(self, name)})))
            missing = [L for L in getattr(self, name) if L not in self.layers]
            if missing:
                raise ValueError(f"{name} {missing} are not among the demo layers {self.layers}")
        self.transfer_layers = tuple(sorted({int(x) for x in self.transfer_layers}))
        self.crosscoder_layers = tuple(sorted({int(x) for x in self.crosscoder_layers}))
        if self.crosscoder_layers and self.crosscoder_seeds < 2:
            raise ValueError(f"crosscoder_seeds must be >= 2 (the seed-to-seed null), got {self.crosscoder_seeds}")
        if self.steer_layers and not self.steer_alphas:
            raise ValueError("steer_alphas must not be empty when steer_layers is set")
        if self.ks[-1] > self.n_latents:
            raise ValueError(f"every k must be <= n_latents={self.n_latents}, got ks={self.ks}")

    @property
    def init_seeds(self) -> tuple[int, ...]:
        """The SAE init seeds at ``k_ref``: the k sweep's (``seed``) first, then the extra ones."""
        return tuple(self.seed + i for i in range(self.sae_seeds))

    def train_config(self) -> TrainConfig:
        """The SAE recipe of every demo SAE (the k sweeps and the transfer section alike)."""
        return TrainConfig(lr=self.lr, warmup_steps=self.warmup_steps, dead_tokens=self.dead_tokens,
                           norm_batches=self.norm_batches)

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A smaller demo (two layers, two k, fewer tokens) for smoke tests: about a minute."""
        return cls(layers=(0, 2), ks=(8, 16), train_tokens=40_000, eval_tokens=8_000, delta_batches=2,
                   delta_max_batches=4,
                   concept_batches=4, sentences=40_000, steer_layers=(2,), steer_prompts=8, order_layers=(0, 2),
                   order_tasks=20, order_seeds=(0,), transfer_layers=(2,), transfer_tokens=40_000,
                   transfer_eval_tokens=4_000, transfer_delta_batches=2, transfer_seeds=2, crosscoder_layers=(2,),
                   crosscoder_tokens=20_000, crosscoder_eval_tokens=2_000, crosscoder_epochs=1, crosscoder_seeds=2)


