"""Benchmark workloads, dlmscope's side: one full Top-K SAE training step per backend, the bare encoder GEMM, and
op-level callables; plus the configuration and data every step / op workload shares (the plain-PyTorch side of
each comparison is in :mod:`baselines`).

Every builder returns a :class:`Workload`: a zero-argument callable that does the work once (on CUDA it does
*not* synchronize; the harness does), and a ``release()`` that drops its tensors so the next variant gets the
memory back. Data are realistic and non-zero: unit-norm random decoder rows, ``W_enc = W_dec.T`` (as rows,
i.e. ``W_enc = W_dec.clone()``), small random biases, random activations; the callables rotate among several
``x`` batches so that repeated calls do not measure a cache-resident input.

Step variants (docs/design.md: the encoder GEMM is the floor of a step), in the order they are timed:

- ``gemm``: the bare encoder GEMM ``x @ W_enc.T`` (no grad) — the floor everything is divided by.
- one variant per dlmscope backend that runs on the device (``torch``, ``cpu``, ``triton``):
  ``dlmscope.topk_encode`` + ``dlmscope.sparse_decode``, backward, ``dlmscope.decoder_norm_step`` for the
  decoder, ``torch.optim.Adam(fused=True)`` for W_enc, b_enc, b_dec; all inside ``value_checks(False)``.
- ``batchtopk``, ``jumprelu``, ``matryoshka``: the same step for the other architectures of :mod:`dlmscope.sae`
  on the fastest backend of the device (``cpu`` on a CPU, ``triton`` on a GPU): their encode rule on the fused
  encoder, the decode (Matryoshka: every prefix from one decode), the loss (JumpReLU: MSE + λ·L0 with the
  straight-through threshold gradient), the decoder step and Adam. At the same mean L0 as Top-K: BatchTopK and
  Matryoshka keep k per row on average by construction; JumpReLU's thresholds start at each latent's
  (1 − k/n)-quantile of the first batch's pre-activations, so its L0 starts at ≈ k (the step's ``info`` records
  the L0 measured on the first batch).
- ``dense``, ``dense_compiled``: the paper's plain-PyTorch step (:func:`baselines.build_step`).

Loss: ``reference.mse_loss``, ``mean_b ||x - x_hat||^2`` (summed in float32 for bf16/fp16).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
from typing import Callable

import torch

import dlmscope
from dlmscope import reference
from dlmscope.backends import get_backend
from dlmscope.sae import CLASSES
from dlmscope.sae.formats import PARAMS
from dlmscope.sae.matryoshka import default_prefixes

LR = 3e-4
BETAS = (0.9, 0.999)
EPS = 1e-8

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}
_DTYPE_TAGS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

#: default shapes (B, d, n, k, dtype) per device; ``quick`` is a seconds-long smoke test anywhere.
DEFAULT_SHAPES = {
    "cpu": (4096, 512, 16384, 32, "fp32"),
    "cuda": (16384, 4096, 131072, 64, "bf16"),
    "quick": (256, 64, 1024, 8, None),  # dtype: the device's default
}
#: (warmup, rounds) per (device, group); ``quick`` overrides both.
DEFAULT_ROUNDS = {
    ("cpu", "step"): (2, 5),
    ("cpu", "ops"): (1, 5),
    ("cuda", "step"): (3, 10),
    ("cuda", "ops"): (3, 10),
    ("quick", "step"): (1, 3),
    ("quick", "ops"): (1, 3),
}

# ---- configuration --------------------------------------------------------------------------------------


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    device: str
    B: int
    d: int
    n: int
    k: int
    dtype: torch.dtype
    quick: bool = False
    backends: tuple[str, ...] = ()
    compile_dense: bool = False
    warmup: int | None = None   # None: DEFAULT_ROUNDS
    rounds: int | None = None

    @property
    def tag(self) -> str:
        t = f"B{self.B}-d{self.d}-n{self.n}-k{self.k}-{_DTYPE_TAGS.get(self.dtype, str(self.dtype))}"
        return ("quick-" + t) if self.quick else t

    def rounds_for(self, group: str) -> tuple[int, int]:
        key = ("quick" if self.quick else self.device, group)
        warmup, rounds = DEFAULT_ROUNDS.get(key, (1, 3))
        return (self.warmup if self.warmup is not None else warmup,
                self.rounds if self.rounds is not None else rounds)

    def shape_dict(self) -> dict:
        return {"B": self.B, "d": self.d, "n": self.n, "k": self.k, "dtype": _DTYPE_TAGS.get(self.dtype),
                "device": self.device, "quick": self.quick}

    @classmethod
    def resolve(cls, device: str | None = None, quick: bool | None = None, shape: str | None = None,
                dtype: str | None = None, backends: str | None = None, compile_dense: bool | None = None,
                warmup: int | None = None, rounds: int | None = None) -> "BenchConfig":
        """Explicit arguments > ``DLMSCOPE_BENCH_*`` environment variables > per-device defaults."""
        env = os.environ.get
        device = device or env("DLMSCOPE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        if quick is None:
            quick = env("DLMSCOPE_BENCH_QUICK", "0") not in ("", "0")
        shape = shape or env("DLMSCOPE_BENCH_SHAPE")
        B, d, n, k, default_dtype = DEFAULT_SHAPES["quick" if quick else device]
        if shape:
            parts = [int(p) for p in shape.replace("x", ",").split(",")]
            if len(parts) != 4:
                raise ValueError(f"shape must be 'B,d,n,k', got {shape!r}")
            B, d, n, k = parts
        dtype = dtype or env("DLMSCOPE_BENCH_DTYPE") or default_dtype or DEFAULT_SHAPES[device][4]
        backends = backends if backends is not None else env("DLMSCOPE_BENCH_BACKENDS", "")
        requested = tuple(b.strip() for b in backends.split(",") if b.strip())
        chosen = select_backends(device, requested)
        if compile_dense is None:
            flag = env("DLMSCOPE_BENCH_COMPILE")
            compile_dense = (device == "cuda") if flag is None else flag not in ("", "0")
        if warmup is None and env("DLMSCOPE_BENCH_WARMUP"):
            warmup = int(env("DLMSCOPE_BENCH_WARMUP"))
        if rounds is None and env("DLMSCOPE_BENCH_ROUNDS"):
            rounds = int(env("DLMSCOPE_BENCH_ROUNDS"))
        return cls(device=device, B=B, d=d, n=n, k=k, dtype=parse_dtype(dtype), quick=bool(quick),
                   backends=chosen, compile_dense=bool(compile_dense), warmup=warmup, rounds=rounds)

    @classmethod
    def from_pytest(cls, config) -> "BenchConfig":
        """The run's configuration from conftest's ``--bench-*`` options, resolved once per pytest session."""
        cached = getattr(config, "_dlmscope_bench_config", None)
        if cached is None:
            o = config.getoption
            cached = cls.resolve(
                device=o("--bench-device"), quick=o("--bench-quick"), shape=o("--bench-shape"),
                dtype=o("--bench-dtype"), backends=o("--bench-backends"), compile_dense=o("bench_compile"),
                warmup=o("--bench-warmup"), rounds=o("--bench-rounds"))
            config._dlmscope_bench_config = cached
        return cached


def select_backends(device: str, requested: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The dlmscope backends to benchmark on ``device``.

    Default: every available backend that supports the device, except ``triton`` on CPU (that is the
    interpreter: a correctness tool, hours at benchmark shapes). Naming backends explicitly overrides that;
    an explicitly named backend that cannot run is an error.
    """
    dev = torch.device(device)
    available = dlmscope.available_backends()
    if requested:
        for name in requested:
            if not get_backend(name).supports(dev):  # raises with the reason if unavailable
                raise ValueError(f"backend {name!r} cannot run on {device}; available: {available}")
        return requested
    out = []
    for name in available:
        if name == "triton" and device == "cpu":
            continue
        if get_backend(name).supports(dev):
            out.append(name)
    return tuple(out)


#: the step variants of the other SAE architectures (:func:`build_arch_step`)
ARCH_VARIANTS = ("batchtopk", "jumprelu", "matryoshka")
#: JumpReLU's L0 coefficient in the benchmarked step (its value does not change the step's work)
L0_COEFFICIENT = 1e-3


def step_variants(cfg: BenchConfig) -> list[str]:
    """Step-group variants in the order they are timed (the GEMM first, the heaviest baselines last)."""
    names = ["gemm", *cfg.backends, *ARCH_VARIANTS, "dense"]
    if cfg.compile_dense:
        names.append("dense_compiled")
    return names


def op_variants(cfg: BenchConfig) -> list[tuple[str, str]]:
    """(op, variant) pairs: ``reference`` (and for the decoder update the foreach-Adam way) + each backend."""
    out = []
    for op in ("encode", "decode_fwd_bwd", "decoder_norm_step"):
        out.append((op, "reference"))
        if op == "decoder_norm_step":
            out.append((op, "adam_foreach"))
        out.extend((op, b) for b in cfg.backends)
    return out


# ---- data -----------------------------------------------------------------------------------------------


def _generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def n_batches_for(cfg: BenchConfig) -> int:
    """Enough x batches to overflow a last-level cache (~128 MB covers CPU L3 and GPU L2), 2..8 of them."""
    x_bytes = cfg.B * cfg.d * torch.empty((), dtype=cfg.dtype).element_size()
    return int(min(8, max(2, math.ceil((128 << 20) / x_bytes))))


def make_batches(cfg: BenchConfig, seed: int = 1234) -> list[torch.Tensor]:
    """Anisotropic, non-centred random activations (like a residual stream), mean ||x||^2 ≈ d."""
    g = _generator(cfg.device, seed)
    scale = torch.rand(cfg.d, generator=g, device=cfg.device) * 1.5 + 0.25
    offset = torch.randn(cfg.d, generator=g, device=cfg.device) * 0.3
    return [(torch.randn(cfg.B, cfg.d, generator=g, device=cfg.device) * scale + offset).to(cfg.dtype)
            for _ in range(n_batches_for(cfg))]


def make_params(cfg: BenchConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Leaf parameters: unit-norm W_dec rows, W_enc = W_dec (rows; i.e. the encoder is W_dec^T), small biases."""
    g = _generator(cfg.device, seed)
    W_dec = torch.randn(cfg.n, cfg.d, generator=g, device=cfg.device)
    W_dec = reference.normalize_rows(W_dec)
    b_enc = torch.randn(cfg.n, generator=g, device=cfg.device) * 0.01
    b_dec = torch.randn(cfg.d, generator=g, device=cfg.device) * 0.01
    params = {"W_enc": W_dec.clone(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    return {name: t.to(cfg.dtype).contiguous().requires_grad_(True) for name, t in params.items()}


class Rotation:
    """Cycles through a list of inputs."""

    def __init__(self, items):
        self.items, self.i = list(items), 0

    def next(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


# ---- workloads ------------------------------------------------------------------------------------------


class Workload:
    """A zero-argument callable plus the state it keeps alive; ``release()`` frees that state."""

    def __init__(self, name: str, fn: Callable[[], object], state: dict, info: dict | None = None):
        self.name, self._fn, self.state, self.info = name, fn, state, dict(info or {})

    def __call__(self):
        return self._fn()

    def release(self) -> None:
        self.state.clear()
        self._fn = None
        if self.info.get("compiled"):
            torch._dynamo.reset()  # compiled graphs and guards hold the parameters
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def adam(params, fused: bool):
    """torch.optim.Adam, fused where asked and supported (falls back to foreach)."""
    if fused:
        try:
            return torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, fused=True), "fused"
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, foreach=True), "foreach"


def build_gemm(cfg: BenchConfig) -> Workload:
    """The bare encoder GEMM ``x @ W_enc.T``: the floor of a step."""
    xs = Rotation(make_batches(cfg))
    W_enc = make_params(cfg)["W_enc"].detach()
    state = {"xs": xs, "W_enc": W_enc}

    @torch.no_grad()
    def fn():
        return state["xs"].next() @ state["W_enc"].T

    return Workload("gemm", fn, state, {"kind": "gemm"})


def update(state: dict, W_dec: torch.Tensor, backend: str) -> None:
    """The update after ``backward`` of every step variant: the fused decoder-norm step on ``W_dec`` (moments
    ``state["m"]``, ``state["v"]``), then fused Adam (``state["opt"]``) on the other parameters."""
    state["step"] += 1
    dlmscope.decoder_norm_step(W_dec.detach(), W_dec.grad, state["m"], state["v"], state["step"], LR, BETAS, EPS,
                               backend=backend)
    W_dec.grad = None
    state["opt"].step()
    state["opt"].zero_grad(set_to_none=True)


def build_backend_step(cfg: BenchConfig, backend: str) -> Workload:
    """dlmscope ops on ``backend``: fused encode/decode autograd ops, fused decoder update, fused Adam."""
    p = make_params(cfg)
    opt, mode = adam([p["W_enc"], p["b_enc"], p["b_dec"]], fused=True)
    m = torch.zeros_like(p["W_dec"], requires_grad=False)
    v = torch.zeros_like(p["W_dec"], requires_grad=False)
    xs = Rotation(make_batches(cfg))
    state = {"p": p, "opt": opt, "m": m, "v": v, "xs": xs, "step": 0}
    k = cfg.k

    def fn():
        P = state["p"]
        x = state["xs"].next()
        with dlmscope.value_checks(False):
            values, indices = dlmscope.topk_encode(x, P["W_enc"], P["b_enc"], P["b_dec"], k, backend=backend)
            x_hat = dlmscope.sparse_decode(values, indices, P["W_dec"], P["b_dec"], backend=backend)
            loss = reference.mse_loss(x, x_hat)
            loss.backward()
            update(state, P["W_dec"], backend)
        return loss

    return Workload(backend, fn, state, {"kind": "step", "backend": backend, "adam": mode})


def arch_backend(cfg: BenchConfig) -> str:
    """The backend the architecture variants run on: the fused one of the device where available."""
    for name in ("cpu", "triton", "cuda"):
        if name in cfg.backends:
            return name
    return cfg.backends[0]


def build_arch_step(cfg: BenchConfig, arch: str) -> Workload:
    """One training step of a BatchTopK, JumpReLU or Matryoshka SAE (see the module docstring)."""
    backend = arch_backend(cfg)
    p = make_params(cfg)
    extra = {"prefixes": list(default_prefixes(cfg.n))} if arch == "matryoshka" else {}
    sae = CLASSES[arch](cfg.d, cfg.n, cfg.k, backend=backend, device=cfg.device, dtype=cfg.dtype, **extra)
    xs = Rotation(make_batches(cfg))
    with torch.no_grad():
        for name in PARAMS:
            getattr(sae, name).copy_(p[name])
        if arch == "jumprelu":   # start at L0 ≈ k: each latent's (1 − k/n)-quantile of the first batch
            pre = reference.pre_activations(xs.items[0].float(), *(p[n].float() for n in ("W_enc", "b_enc", "b_dec")))
            rank = max(1, round(cfg.B * (1 - cfg.k / cfg.n)))   # kthvalue: quantile() refuses inputs this large
            sae.log_threshold.copy_(pre.kthvalue(rank, dim=0).values.clamp_min(1e-3).log())
        sae.train()
        first = sae.encode(xs.items[0]) if arch == "jumprelu" else sae.encode(xs.items[0], update_threshold=False)
        l0 = float((first[0] > 0).sum(-1).float().mean())
    params = [sae.W_enc, sae.b_enc, sae.b_dec] + ([sae.log_threshold] if arch == "jumprelu" else [])
    opt, mode = adam(params, fused=True)
    state = {"sae": sae, "opt": opt, "m": torch.zeros_like(sae.W_dec), "v": torch.zeros_like(sae.W_dec), "xs": xs,
             "step": 0}

    def fn():
        sae, x = state["sae"], state["xs"].next()
        with dlmscope.value_checks(False):
            if arch == "jumprelu":
                values, indices, l0_term = sae.encode_with_l0(x)
                loss = reference.mse_loss(x, sae.decode(values, indices)) + L0_COEFFICIENT * l0_term
            elif arch == "matryoshka":
                loss = sae.prefix_losses(x).sum()
            else:
                loss = reference.mse_loss(x, sae.decode(*sae.encode(x)))
            loss.backward()
            update(state, sae.W_dec, backend)
        return loss

    return Workload(arch, fn, state, {"kind": "step", "arch": arch, "backend": backend, "adam": mode,
                                      "l0_first_batch": l0})


def build_step(cfg: BenchConfig, variant: str) -> Workload:
    """``gemm``, a backend's step or an architecture's (the ``dense`` variants: :func:`baselines.build_step`)."""
    if variant == "gemm":
        return build_gemm(cfg)
    if variant in ARCH_VARIANTS:
        return build_arch_step(cfg, variant)
    return build_backend_step(cfg, variant)


# ---- op-level workloads ---------------------------------------------------------------------------------


def op_inputs(cfg: BenchConfig, op: str) -> dict:
    """The inputs of ``op``, the same (fresh, equal data) for every implementation of it; a builder's state."""
    p = {name: t.detach() for name, t in make_params(cfg).items()}
    if op == "encode":
        return {"p": p, "xs": Rotation(make_batches(cfg))}
    if op == "decode_fwd_bwd":
        # realistic codes: the top-k of the actual encoder on each batch; a random upstream gradient.
        codes = []
        g = _generator(cfg.device, 99)
        with torch.no_grad():
            for x in make_batches(cfg):
                values, indices = reference.topk_encode(x, p["W_enc"], p["b_enc"], p["b_dec"], cfg.k)
                grad_out = torch.randn(cfg.B, cfg.d, generator=g, device=cfg.device).to(cfg.dtype)
                codes.append((values.contiguous(), indices.contiguous(), grad_out))
        W_dec = p["W_dec"].clone().requires_grad_(True)
        b_dec = p["b_dec"].clone().requires_grad_(True)
        return {"codes": Rotation(codes), "W_dec": W_dec, "b_dec": b_dec}
    if op == "decoder_norm_step":
        g = _generator(cfg.device, 7)
        grads = [(torch.randn(cfg.n, cfg.d, generator=g, device=cfg.device) * 1e-3).to(cfg.dtype)
                 for _ in range(2)]
        W = p["W_dec"].clone()
        return {"W": W, "m": torch.zeros_like(W), "v": torch.zeros_like(W), "grads": Rotation(grads), "step": 0}
    raise ValueError(f"unknown op {op!r}")


def build_op(cfg: BenchConfig, op: str, backend: str) -> Workload:
    """One op on a dlmscope backend (the ``reference`` and ``adam_foreach`` variants: :func:`baselines.build_op`)."""
    state = op_inputs(cfg, op)
    k = cfg.k
    info = {"kind": "op", "op": op}

    if op == "encode":
        @torch.no_grad()
        def fn():
            P = state["p"]
            with dlmscope.value_checks(False):
                return dlmscope.topk_encode(state["xs"].next(), P["W_enc"], P["b_enc"], P["b_dec"], k, backend=backend)
    elif op == "decode_fwd_bwd":
        def fn():
            values, indices, grad_out = state["codes"].next()
            values = values.detach().requires_grad_(True)
            with dlmscope.value_checks(False):
                x_hat = dlmscope.sparse_decode(values, indices, state["W_dec"], state["b_dec"], backend=backend)
            return torch.autograd.grad(x_hat, (values, state["W_dec"], state["b_dec"]), grad_out)
    elif op == "decoder_norm_step":
        def fn():
            state["step"] += 1
            with dlmscope.value_checks(False):
                dlmscope.decoder_norm_step(state["W"], state["grads"].next(), state["m"], state["v"],
                                           state["step"], LR, BETAS, EPS, backend=backend)
    else:
        raise ValueError(f"unknown op {op!r}")
    return Workload(f"{op}/{backend}", fn, state, info)


__all__ = ["BenchConfig", "Workload", "build_step", "build_op", "op_inputs", "step_variants", "op_variants",
           "select_backends", "make_batches", "make_params", "parse_dtype", "adam"]
