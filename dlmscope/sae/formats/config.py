"""What every checkpoint format stores: an :class:`SAEConfig` and the four parameter tensors.

Tensors (docs/design.md conventions): ``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]`` (row i = decoder direction of
latent i), ``b_dec [d]``. :class:`dlmscope.sae.topk.TopKSAE` is built from exactly this pair and gives it back to be
saved; the formats layer knows nothing else of the module.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

#: The parameter tensors of a Top-K SAE, in the order the savers write them.
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclasses.dataclass
class SAEConfig:
    """Shape and metadata of one SAE; round-trips through JSON (``cfg.json``). Invariant: ``1 <= k <= n``."""

    d: int
    n: int
    k: int
    #: free-form provenance: model, layer, hook point, mask policy, training tokens, norm factor...
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("d", "n", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.k > self.n:
            raise ValueError(f"SAEConfig.k must be <= n, got k={self.k}, n={self.n}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SAEConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """The shape each of :data:`PARAMS` must have for ``cfg``."""
    d, n = cfg.d, cfg.n
    return {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}


def check_state(cfg: SAEConfig, tensors: Mapping, *, where: str = "cannot save") -> None:
    """Check that ``tensors`` holds each of :data:`PARAMS` in the shape ``cfg`` needs (:func:`param_shapes`);
    ``ValueError`` otherwise, its message starting with ``where`` (who is checking)."""
    for name, shape in param_shapes(cfg).items():
        if name not in tensors:
            raise ValueError(f"{where}: missing tensor {name!r} (got {sorted(tensors)})")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ValueError(f"{where}: {name} has shape {list(got)}, the SAE's cfg (d={cfg.d}, n={cfg.n}) "
                             f"needs {list(shape)}")
