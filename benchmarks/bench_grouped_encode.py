"""Grouped encoder benchmark: the paper's sweep of six SAEs trained off one activation stream.

Shape (CPU default): B=4096, d=512, six SAEs of n=16384 latents with ks = [50, 80, 160, 320, 520, 820] stacked into
W_enc [98304, 512]; AuxK: aux_mask with ~30% of the latents True, k_aux = 256 per SAE. ``--bench-quick``: B=256, d=64,
six SAEs of n=1024, ks = [4, 6, 8, 12, 16, 24], k_aux = 32. (``--bench-shape`` is ignored here: this group has its
own fixed sweep; dtype and device follow the usual options.)

One group, ``grouped_encode``, forward only (no grad):

- ``gemm``: the bare GEMM ``x @ W_all.T`` over all S stacked latents — the floor (it writes the B x S output).
- per backend that fuses ``encode_grouped`` (the ``cpu`` backend):
  ``<b>:fused``          ``dlmscope.ops.topk_encode_grouped`` of all six (one GEMM pass),
  ``<b>:separate``       six ``dlmscope.topk_encode`` calls, one per SAE,
  ``<b>:fused_aux``      the grouped op with AuxK active (aux selection from the same tiles),
  ``<b>:composite_aux``  the unfused composite (``Backend.encode_grouped``: two encodes — two GEMMs — per SAE).

Rounds are few by default (warmup 1, rounds 3): every call is seconds long on CPU.
"""
from __future__ import annotations

import dataclasses

import torch

import dlmscope
import workloads
from dlmscope.backends import get_backend
from dlmscope.backends.base import Backend

GROUP = "grouped_encode"
SWEEP = {  # (B, d, n per SAE, ks, k_aux)
    "full": (4096, 512, 16384, [50, 80, 160, 320, 520, 820], 256),
    "quick": (256, 64, 1024, [4, 6, 8, 12, 16, 24], 32),
}
AUX_FRACTION = 0.3


def _fused_backends(cfg: workloads.BenchConfig) -> list[str]:
    """Backends of the run that override the composite ``encode_grouped`` with a fused kernel."""
    return [b for b in cfg.backends if type(get_backend(b)).encode_grouped is not Backend.encode_grouped]


def pytest_generate_tests(metafunc):
    """Variants: the GEMM floor first, then four per backend of the run that fuses ``encode_grouped``."""
    if "grouped_variant" not in metafunc.fixturenames:
        return
    cfg = workloads.BenchConfig.from_pytest(metafunc.config)
    variants = ["gemm", *[f"{b}:{v}" for b in _fused_backends(cfg)
                          for v in ("fused", "separate", "fused_aux", "composite_aux")]]
    metafunc.parametrize("grouped_variant", variants)


def _sweep_config(cfg: workloads.BenchConfig):
    B, d, n, ks, k_aux = SWEEP["quick" if cfg.quick else "full"]
    S = n * len(ks)
    # the stacked shape as a BenchConfig (k: the largest k of the sweep, for the tag only)
    return dataclasses.replace(cfg, B=B, d=d, n=S, k=max(ks)), n, ks, k_aux


def _build(cfg: workloads.BenchConfig, variant: str, n: int, ks: list[int], k_aux: int) -> workloads.Workload:
    p = {name: t.detach() for name, t in workloads.make_params(cfg).items()}
    xs = workloads.Rotation(workloads.make_batches(cfg))
    sizes = [n] * len(ks)
    g = torch.Generator(device=cfg.device).manual_seed(5)
    mask = torch.rand(cfg.n, generator=g, device=cfg.device) < AUX_FRACTION
    state = {"p": p, "xs": xs, "mask": mask}
    info = {"kind": "grouped_encode", "sizes": sizes, "ks": ks, "k_aux": k_aux, "aux_fraction": AUX_FRACTION}
    if variant == "gemm":
        @torch.no_grad()
        def fn():
            return state["xs"].next() @ state["p"]["W_enc"].T
        return workloads.Workload(variant, fn, state, info)

    backend, how = variant.split(":")
    info["backend"] = backend
    impl = get_backend(backend)

    @torch.no_grad()
    def fn():
        P, x = state["p"], state["xs"].next()
        with dlmscope.value_checks(False):
            if how == "fused":
                return dlmscope.ops.topk_encode_grouped(x, P["W_enc"], P["b_enc"], P["b_dec"], ks, sizes,
                                                        backend=backend)
            if how == "fused_aux":
                return dlmscope.ops.topk_encode_grouped(x, P["W_enc"], P["b_enc"], P["b_dec"], ks, sizes,
                                                        aux_mask=state["mask"], k_aux=[k_aux] * len(ks),
                                                        backend=backend)
            if how == "separate":
                return [dlmscope.topk_encode(x, P["W_enc"][g * n:(g + 1) * n], P["b_enc"][g * n:(g + 1) * n],
                                             P["b_dec"], k, backend=backend) for g, k in enumerate(ks)]
            if how == "composite_aux":  # the base class: one encode per segment + one more for its aux selection
                return Backend.encode_grouped(impl, x, P["W_enc"], P["b_enc"], P["b_dec"], ks, sizes,
                                              state["mask"], [k_aux] * len(ks))
        raise ValueError(f"unknown variant {variant!r}")

    return workloads.Workload(variant, fn, state, info)


def test_grouped_encode(bench_runner, bench_config, grouped_variant):
    cfg, n, ks, k_aux = _sweep_config(bench_config)
    runner = type(bench_runner)(bench_runner.request, bench_runner.benchmark, cfg)  # the sweep's shape tag
    runner.run(GROUP, grouped_variant, lambda: _build(cfg, grouped_variant, n, ks, k_aux),
               {"n_per_sae": n, "n_saes": len(ks), "ks": ks, "k_aux": k_aux})
