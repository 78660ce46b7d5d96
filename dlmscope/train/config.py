"""The trainer's recipe: :class:`TrainConfig` (what is trained and how the run is kept), JSON round trips, and the
schedule of JumpReLU's L0 coefficient (:meth:`TrainConfig.l0_weight_at`). Where metrics go is
:class:`~dlmscope.train.log.LogConfig`."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .log import LogConfig
from .normalization import NORMALIZATIONS

__all__ = ["TrainConfig"]


@dataclasses.dataclass
class TrainConfig:
    """What is trained and how the run is kept (length, recipe, checkpoints, seed, backend, NaN checks); defaults
    follow the paper's code except ``normalization`` (the paper's is "rms") and JumpReLU's ``l0_*`` (SAELens's, the
    paper has no JumpReLU). Where metrics go is
    :class:`~dlmscope.train.log.LogConfig`. Round-trips through JSON."""

    #: training length: ``steps`` (batches) or ``total_tokens`` (steps = ceil(total_tokens / global batch of the
    #: first step)); if both are None, ``len(stream)``.
    steps: int | None = None
    total_tokens: int | None = None
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 1000
    decay_fraction: float = 0.2
    #: max global grad norm per SAE (None: no clipping)
    grad_clip: float | None = 1.0
    auxk_alpha: float = 1 / 32
    #: AuxK latents per SAE (None: min(d // 2, n)); Top-K, BatchTopK and Matryoshka SAEs
    k_aux: int | None = None
    #: JumpReLU SAEs only: lambda of the L0 penalty, in SAELens's units (its JumpReLUTrainingSAE default, 1.0): the
    #: loss term is ``(lambda / d) * L0`` because SAELens trains on activations scaled to ``E|x|^2 = d`` and this
    #: trainer on ``E|x|^2 ~ 1`` (``normalization="rms"``: exactly SAELens's loss divided by d; the default
    #: "centred" matches it where the stream's mean is small against its spread) — see :meth:`l0_weight_at`
    l0_coefficient: float = 1.0
    #: JumpReLU SAEs only: lambda rises linearly from 0 over this many steps (SAELens's ``l0_warm_up_steps``,
    #: default 0: the full lambda from the first step)
    l0_warmup_steps: int = 0
    #: a latent is dead when it has not fired for this many (global) tokens
    dead_tokens: int = 10_000_000
    normalize_activations: bool = True
    #: the norm factor: "centred" (root of the total variance) or "rms" (the paper's, the root mean square norm);
    #: "rms" fails where the stream's mean dwarfs its variance (dlmscope.train.normalization)
    normalization: str = "centred"
    norm_batches: int = 100
    #: initialise b_dec to the geometric median of the first batch (fresh runs only)
    init_b_dec: bool = True
    geometric_median_iters: int = 100
    #: None (the master dtype) or "bfloat16": ops on bf16 casts of activations and weights, fp32 master weights
    autocast_dtype: str | None = None
    #: one grouped encoder op for SAEs sharing device/dtype (False: one op call per SAE)
    group_encoders: bool = True
    checkpoint_dir: str | None = None
    #: checkpoint every this many steps (None/0: only at the end, if checkpoint_dir is set)
    checkpoint_every: int | None = None
    #: seeds python / numpy / torch at the start of a fresh run (training itself draws no random numbers)
    seed: int | None = 0
    #: ops backend (None: best for the device)
    backend: str | None = None
    #: NaN/Inf check of the stream: "auto" (per batch on CPU, deferred device flag elsewhere), "batch", "deferred"
    nan_check: str = "auto"

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.nan_check not in ("auto", "batch", "deferred"):
            raise ValueError(f"nan_check must be 'auto', 'batch' or 'deferred', got {self.nan_check!r}")
        for name in ("steps", "total_tokens", "checkpoint_every", "k_aux", "l0_warmup_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"TrainConfig.{name} must be a non-negative int or None, got {value!r}")
        if self.dead_tokens < 1 or self.norm_batches < 0 or self.warmup_steps < 0:
            raise ValueError("dead_tokens must be >= 1 and norm_batches, warmup_steps >= 0")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must lie in [0, 1], got {self.decay_fraction}")
        if isinstance(self.l0_coefficient, bool) or not isinstance(self.l0_coefficient, (int, float)) \
                or not (math.isfinite(self.l0_coefficient) and self.l0_coefficient >= 0):
            raise ValueError(f"TrainConfig.l0_coefficient must be a finite number >= 0, got {self.l0_coefficient!r}")
        self.l0_coefficient = float(self.l0_coefficient)

    def l0_weight_at(self, step: int, d: int) -> float:
        """The weight of a JumpReLU SAE's L0 penalty at ``step`` (0-based) for activations of width ``d``:
        ``l0_coefficient * min(1, step / l0_warmup_steps) / d`` — SAELens's linear coefficient warm-up (0 at the
        first step, the full value from step ``l0_warmup_steps`` on), and its lambda moved to this trainer's
        activation scale (``l0_coefficient``)."""
        warm = min(1.0, step / self.l0_warmup_steps) if self.l0_warmup_steps else 1.0
        return self.l0_coefficient * warm / d

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """From a dict of TrainConfig fields; any other key raises (logging options name :meth:`split_dict`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        logging_keys = sorted(set(data) & {f.name for f in dataclasses.fields(LogConfig)})
        if logging_keys:
            raise ValueError(f"{logging_keys} are logging options (LogConfig), not TrainConfig fields; read a dict "
                             "holding both with TrainConfig.split_dict(data)")
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def split_dict(cls, data: dict) -> tuple["TrainConfig", LogConfig]:
        """``(TrainConfig, LogConfig)`` from one dict holding fields of both (e.g. one JSON file for a whole run)."""
        recipe = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in data.items() if k in recipe}), LogConfig.from_dict(data, ignore=recipe)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | Path) -> "TrainConfig":
        """From a JSON string, or from a path to a JSON file."""
        if isinstance(text, Path) or (isinstance(text, str) and not text.lstrip().startswith("{")):
            text = Path(text).read_text()
        return cls.from_dict(json.loads(text))

