"""What every checkpoint format stores: an :class:`SAEConfig` and the parameter tensors.

Tensors (docs/design.md conventions): ``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]`` (row i = decoder direction of
latent i), ``b_dec [d]``, and the extra tensors of the SAE's architecture (:data:`ARCHS`): a ``threshold`` —
one per latent ``[n]`` for JumpReLU, one global ``[]`` for BatchTopK and Matryoshka at inference. The SAE classes of
:mod:`dlmscope.sae` are built from exactly this pair and give it back to be saved; the formats layer knows nothing
else of the modules.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

#: The parameter tensors of a Top-K SAE, in the order the savers write them.
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
#: architecture -> its tensors beyond :data:`PARAMS`, each with its shape in terms of ``d`` and ``n``
ARCHS: dict[str, dict[str, tuple[str, ...]]] = {
    "topk": {},
    "batchtopk": {"threshold": ()},
    "jumprelu": {"threshold": ("n",)},
    "matryoshka": {"threshold": ()},
}
#: ``k`` of a JumpReLU SAE read from a peer checkpoint, which has none (it is only the width the sparse code starts
#: from: :class:`dlmscope.sae.jumprelu.JumpReLUSAE` widens it where a row has more latents above threshold)
JUMPRELU_DEFAULT_K = 64


def default_jumprelu_k(n: int) -> int:
    """The ``k`` given to a JumpReLU SAE of ``n`` latents whose checkpoint names none: min(n, 64)."""
    return min(n, JUMPRELU_DEFAULT_K)


@dataclasses.dataclass
class SAEConfig:
    """Shape and metadata of one SAE; round-trips through JSON (``cfg.json``). Invariant: ``1 <= k <= n``.

    ``k`` is the number of active latents per row for ``topk``, their mean over a batch for ``batchtopk`` and
    ``matryoshka``, and for ``jumprelu`` (which has no k) the width of the sparse code the encoder starts from
    (it widens a row that has more latents above threshold). ``prefixes`` (``matryoshka`` only): the nested
    dictionary sizes ``m_1 < … < m_P = n``."""

    d: int
    n: int
    k: int
    #: free-form provenance: model, layer, hook point, mask policy, training tokens, norm factor...
    meta: dict = dataclasses.field(default_factory=dict)
    #: the sparsity rule, a key of :data:`ARCHS`
    arch: str = "topk"
    prefixes: list[int] | None = None

    def __post_init__(self):
        for name in ("d", "n", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.k > self.n:
            raise ValueError(f"SAEConfig.k must be <= n, got k={self.k}, n={self.n}")
        if self.arch not in ARCHS:
            raise ValueError(f"SAEConfig.arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        if (self.arch == "matryoshka") != (self.prefixes is not None):
            raise ValueError("SAEConfig.prefixes is required for arch 'matryoshka' and only for it")
        if self.prefixes is not None:
            p = self.prefixes
            if (not isinstance(p, list) or not p or any(isinstance(m, bool) or not isinstance(m, int) for m in p)
                    or any(a >= b for a, b in zip(p, p[1:])) or p[0] < 1 or p[-1] != self.n):
                raise ValueError(f"SAEConfig.prefixes must be increasing positive ints ending at n={self.n}, "
                                 f"got {p!r}")

    def to_dict(self) -> dict:
        """The JSON fields; ``arch`` and ``prefixes`` only where they are not a Top-K SAE's defaults."""
        out = dataclasses.asdict(self)
        if self.arch == "topk":
            del out["arch"]
        if self.prefixes is None:
            del out["prefixes"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SAEConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """The shape each tensor of ``cfg``'s SAE must have: :data:`PARAMS` and its architecture's extras."""
    d, n = cfg.d, cfg.n
    dims = {"d": d, "n": n}
    extras = {name: tuple(dims[s] for s in shape) for name, shape in ARCHS[cfg.arch].items()}
    return {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), **extras}


def tensor_names(cfg: SAEConfig) -> tuple[str, ...]:
    """The tensors of ``cfg``'s SAE, in the order the savers write them."""
    return PARAMS + tuple(ARCHS[cfg.arch])


def check_state(cfg: SAEConfig, tensors: Mapping, *, where: str = "cannot save") -> None:
    """Check that ``tensors`` holds each tensor of ``cfg``'s SAE in the shape it needs (:func:`param_shapes`);
    ``ValueError`` otherwise, its message starting with ``where`` (who is checking)."""
    for name, shape in param_shapes(cfg).items():
        if name not in tensors:
            raise ValueError(f"{where}: missing tensor {name!r} (got {sorted(tensors)})")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ValueError(f"{where}: {name} has shape {list(got)}, the SAE's cfg (d={cfg.d}, n={cfg.n}) "
                             f"needs {list(shape)}")
