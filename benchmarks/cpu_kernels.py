"""The CPU kernels of ``dlmscope._C`` at their tile edges, and what each primitive costs: a kernel-tuning tool.

    python benchmarks/cpu_kernels.py                 # checks (float64 + float32), then timings
    python benchmarks/cpu_kernels.py --check-only
    python benchmarks/cpu_kernels.py --bench-only --reps 7 --B 4096 --d 512 --n 16384 --k 32
    python benchmarks/cpu_kernels.py --bench-only --tiles 256x512 128x1024   # compare topk_encode tile shapes
    python benchmarks/cpu_kernels.py --quick         # smoke test: checks + timings at benchmarks' quick shape

This covers what the suites (``bench_*.py``) do not. The checks call the C++ kernels directly, with explicit tile shapes
(``row_block`` x ``latent_block``), latent splits, row-block tails and many small segments, and compare them with
``dlmscope.reference``. The timings take the decoder backward apart into its primitives and compare tile shapes.
Whole steps, op-level comparisons and the grouped encoder are benchmarked by the suites (``python
benchmarks/report.py``, ``pytest benchmarks/bench_grouped_encode.py``); the ``step`` row here is the ``cpu`` step
workload of ``benchmarks/workloads.py``, and all timed data come from its ``make_params`` / ``make_batches``.

Every time is printed as a multiple of the bare encoder GEMM ``x @ W_enc.T`` measured in the same run, interleaved
with the op (one GEMM right before every op measurement), so that a noisy shared machine affects both alike; the
ratio reported is median(op) / median(GEMM) (and min/min).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # the repo's dlmscope, also when it is not installed
sys.path.insert(1, HERE)
import workloads  # noqa: E402  (the benchmark data and step workloads)

from dlmscope import _C, reference  # noqa: E402
from dlmscope.backends import get_backend  # noqa: E402


# ---- correctness against dlmscope.reference ---------------------------------------------------------------------
def _random_sae(B, d, n, dtype, gen, negative_fraction):
    """x [B,d], W [n,d], b_enc [n], b_dec [d]; a ``negative_fraction`` of latents get a bias of about -100."""
    x = torch.randn(B, d, dtype=dtype, generator=gen)
    W = torch.randn(n, d, dtype=dtype, generator=gen) / d**0.5
    be = torch.randn(n, dtype=dtype, generator=gen) * 0.1
    if negative_fraction > 0:
        be[torch.rand(n, generator=gen) < negative_fraction] -= 100.0
    bd = torch.randn(d, dtype=dtype, generator=gen) * 0.1
    return x, W, be, bd


def check_topk(dtype, gen):
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    cases = [  # B, d, n, k, row_block, latent_block, negative-bias fraction
        (7, 33, 50, 1, 0, 0, 0.0),
        (5, 17, 40, 40, 0, 0, 0.0),          # k = n
        (9, 65, 300, 5, 0, 0, 0.97),          # many rows with < k positives
        (13, 24, 257, 7, 3, 17, 0.5),         # odd tiles, tails
        (1, 40, 3000, 16, 0, 0, 0.0),         # B=1: latent splits + merge
        (3, 31, 2000, 64, 0, 0, 0.9),         # splits + padding
        (600, 100, 1100, 32, 0, 0, 0.0),      # several row blocks, odd n
        (64, 512, 4096, 128, 0, 0, 0.0),
        (4, 8, 100, 50, 0, 0, 1.0),           # everything negative: all padding
    ]
    for B, d, n, k, R, N, neg in cases:
        x, W, be, bd = _random_sae(B, d, n, dtype, gen, neg)
        vals, idx = _C.topk_encode(x, W, be, bd, k, R, N)
        assert vals.shape == (B, k) and idx.shape == (B, k) and idx.dtype == torch.int64 and vals.dtype == dtype
        relu = torch.relu(reference.pre_activations(x, W, be, bd))
        rv, _ = reference.topk_encode(x, W, be, bd, k)
        got_sorted = vals.sort(-1, descending=True).values
        assert torch.allclose(got_sorted, rv, atol=tol, rtol=tol), (B, d, n, k, (got_sorted - rv).abs().max())
        assert bool((idx >= 0).all()) and bool((idx < n).all())
        assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all()), "indices not distinct within a row"
        assert torch.allclose(relu.gather(1, idx), vals, atol=tol, rtol=tol), "values != relu(pre) at indices"
        assert bool((vals >= 0).all())
    print(f"  topk_encode        {str(dtype):14s} ok ({len(cases)} shapes)")


def _check_selection(vals, idx, pre, k, lo, hi, allowed, tol, what):
    """vals/idx [B,k] is a valid top-k of relu(pre) restricted to latents [lo, hi) where ``allowed``."""
    B = pre.shape[0]
    assert vals.shape == (B, k) and idx.shape == (B, k), what
    if k == 0:
        return
    assert bool((idx >= lo).all()) and bool((idx < hi).all()), f"{what}: ids outside the segment"
    assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all()), f"{what}: ids not distinct within a row"
    masked = torch.where(allowed[lo:hi], torch.relu(pre[:, lo:hi]), torch.full_like(pre[:, lo:hi], -1.0))
    rv = masked.topk(k, dim=-1).values.clamp_min(0)  # fewer than k allowed positives: zero padding
    assert torch.allclose(vals.sort(-1, descending=True).values, rv, atol=tol, rtol=tol), \
        f"{what}: wrong values {(vals.sort(-1, descending=True).values - rv).abs().max()}"
    at = torch.relu(pre).gather(1, idx)
    nz = vals > 0
    assert torch.allclose(at[nz], vals[nz], atol=tol, rtol=tol), f"{what}: values != relu(pre) at indices"
    assert bool(allowed[idx[nz]].all()), f"{what}: a non-zero value at a latent outside the mask"
    assert bool((vals >= 0).all()), what


def check_grouped(dtype, gen):
    """topk_encode_grouped vs the reference per segment; ids global; aux only masked latents (zero padding)."""
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    cases = [  # B, d, sizes, ks, k_aux (None: no mask), mask kind, row_block, latent_block, negative-bias fraction
        (7, 33, [17, 30, 9], [3, 1, 9], [4, 6, 2], "rand", 0, 0, 0.0),
        (9, 40, [600, 700, 1100], [50, 80, 160], [64, 0, 128], "rand", 0, 0, 0.0),   # k_aux = 0 for one
        (33, 20, [5] * 40 + [13] * 20, [1, 5] * 20 + [3] * 20, [2, 0, 5, 1] * 15, "rand", 0, 0, 0.3),  # many small
        (1, 64, [1000, 1500, 700, 40, 3000], [16, 1500, 3, 40, 64], [32, 7, 700, 40, 0], "rand", 0, 0, 0.5),  # B=1
        (5, 24, [300, 257, 100], [300, 1, 99], [300, 257, 100], "all", 0, 0, 0.9),   # k_g = size_g, all masked
        (6, 24, [300, 257, 100], [7, 8, 9], [5, 6, 7], "none", 0, 0, 0.0),          # mask all False
        (300, 50, [2048, 513, 1531], [32, 64, 128], [16, 16, 16], "rand", 0, 0, 0.0),  # several row blocks
        (13, 24, [257, 40, 300], [7, 40, 5], [9, 3, 300], "rand", 3, 17, 0.5),     # odd tiles, segments span tiles
        (600, 100, [1100, 7], [32, 7], None, None, 0, 0, 0.0),                      # no aux
        (4, 8, [60, 40], [50, 20], [10, 40], "rand", 0, 0, 1.0),                    # everything negative
    ]
    for B, d, sizes, ks, k_aux, mask_kind, R, N, neg in cases:
        S = sum(sizes)
        x, W, be, bd = _random_sae(B, d, S, dtype, gen, neg)
        if mask_kind is None:
            mask = None
        else:
            mask = {"rand": torch.rand(S, generator=gen) < 0.3, "all": torch.ones(S, dtype=torch.bool),
                    "none": torch.zeros(S, dtype=torch.bool)}[mask_kind]
        v, i, av, ai = _C.topk_encode_grouped(x, W, be, bd, ks, sizes, mask, k_aux or [], R, N)
        assert v.dtype == dtype and i.dtype == torch.int64 and v.shape == (B, sum(ks))
        assert av.shape == (B, sum(k_aux) if mask is not None else 0) and ai.shape == av.shape
        pre = reference.pre_activations(x, W, be, bd)
        everything = torch.ones(S, dtype=torch.bool)
        lo = col = acol = 0
        for g, (size, k) in enumerate(zip(sizes, ks)):
            _check_selection(v[:, col:col + k], i[:, col:col + k], pre, k, lo, lo + size, everything, tol,
                             f"segment {g} of {sizes}")
            if mask is not None:
                ka = k_aux[g]
                _check_selection(av[:, acol:acol + ka], ai[:, acol:acol + ka], pre, ka, lo, lo + size, mask, tol,
                                 f"aux segment {g} of {sizes}")
                acol += ka
            lo += size
            col += k
        # one segment, no aux == topk_encode (same plan, same kernel: identical output)
        v1, i1 = _C.topk_encode(x, W, be, bd, ks[0] if sizes == [S] else min(ks[0], S), R, N)
        v2, i2, _, _ = _C.topk_encode_grouped(x, W, be, bd, [v1.shape[1]], [S], None, [], R, N)
        assert torch.equal(v1, v2) and torch.equal(i1, i2), "topk_encode != one-segment topk_encode_grouped"
    print(f"  topk_encode_grouped {str(dtype):13s} ok ({len(cases)} shapes)")


def check_sparse(dtype, gen):
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for B, d, n, k in [(5, 33, 20, 1), (17, 100, 7, 6), (31, 129, 500, 9), (64, 512, 3000, 32), (3, 5, 1, 4)]:
        coef = torch.randn(B, k, dtype=dtype, generator=gen)
        idx = torch.randint(0, max(1, n // 2), (B, k), generator=gen)  # duplicates + unused latents
        idx[0] = idx[0, 0]  # a row with all-duplicate ids
        W = torch.randn(n, d, dtype=dtype, generator=gen)
        X = torch.randn(B, d, dtype=dtype, generator=gen)
        got = _C.gather_accumulate(coef, idx, W)
        assert torch.allclose(got, reference.gather_accumulate(coef, idx, W), atol=tol, rtol=tol), "gather_accumulate"
        out, cs, sd = _C.transpose_reduce(coef, idx, X, n, None)
        rout, rcs = reference.transpose_reduce(coef, idx, X, n)
        assert sd.numel() == 0
        assert torch.allclose(out, rout, atol=tol, rtol=tol) and torch.allclose(cs, rcs, atol=tol, rtol=tol), "tr"
        out2, cs2, sd2 = _C.transpose_reduce(coef, idx, X, n, W)
        assert torch.allclose(out2, out, atol=tol, rtol=tol) and torch.allclose(cs2, cs, atol=tol, rtol=tol), "fused tr"
        rsd = reference.sddmm(X, idx, W)
        assert torch.allclose(sd2, rsd, atol=tol, rtol=tol), "fused sddmm"
        assert torch.allclose(_C.sddmm(X, idx, W), rsd, atol=tol, rtol=tol), "sddmm"
        out3, _, _ = _C.transpose_reduce(coef, idx, X, n, None)
        assert torch.equal(out3, out), "transpose_reduce is not deterministic"
    print(f"  gather/transpose/sddmm {str(dtype):10s} ok")


def check_decoder_norm(dtype, gen):
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    n, d = 37, 129
    W = reference.normalize_rows(torch.randn(n, d, dtype=dtype, generator=gen))
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    W2, m2, v2 = W.clone(), m.clone(), v.clone()
    for step in range(1, 5):
        grad = torch.randn(n, d, dtype=dtype, generator=gen)
        g0 = grad.clone()
        _C.decoder_norm_step(W, grad, m, v, step, 1e-2, 0.9, 0.999, 1e-8)
        reference.decoder_norm_step(W2, grad, m2, v2, step, 1e-2, (0.9, 0.999), 1e-8)
        assert torch.equal(grad, g0), "grad modified"
        for a, b, name in ((W, W2, "W"), (m, m2, "exp_avg"), (v, v2, "exp_avg_sq")):
            assert torch.allclose(a, b, atol=tol, rtol=1e-5 if dtype == torch.float32 else 1e-10), name
    print(f"  decoder_norm_step  {str(dtype):14s} ok")


def run_checks():
    print("correctness vs dlmscope.reference:")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        check_topk(dtype, gen)
        check_grouped(dtype, gen)
        check_sparse(dtype, gen)
        check_decoder_norm(dtype, gen)


# ---- timings ------------------------------------------------------------------------------------------------------
def _t(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


class Bench:
    """Times ``f`` ``reps`` times, each right after one call of ``gemm``; prints and keeps the ratios."""

    def __init__(self, gemm, reps):
        self.gemm, self.reps, self.rows = gemm, reps, []

    def __call__(self, name, f):
        gs, ts = [], []
        for _ in range(self.reps):
            gs.append(_t(self.gemm))
            ts.append(_t(f))
        gm, tm = statistics.median(gs), statistics.median(ts)
        self.rows.append((name, tm, tm / gm, min(ts) / min(gs)))
        print(f"  {name:34s} {tm * 1e3:9.1f} ms   {tm / gm:6.3f}x GEMM (median)   {min(ts) / min(gs):6.3f}x (min/min)",
              flush=True)
        return tm / gm


def run_bench(cfg: workloads.BenchConfig, reps: int, tiles):
    p = {name: t.detach() for name, t in workloads.make_params(cfg).items()}
    W_enc, b_enc, W_dec, b_dec = p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]
    xs = workloads.Rotation(workloads.make_batches(cfg))
    B, d, n, k = cfg.B, cfg.d, cfg.n, cfg.k
    gemm = lambda: xs.next() @ W_enc.T  # noqa: E731
    for _ in range(2):
        gemm()
    gm = statistics.median(_t(gemm) for _ in range(3))
    print(f"\nB={B} d={d} n={n} k={k} {cfg.dtype}, threads={torch.get_num_threads()}; "
          f"bare GEMM x @ W_enc.T ≈ {gm:.3f} s")
    bench = Bench(gemm, reps)
    if tiles:
        for tile in tiles:
            R, N = map(int, tile.split("x"))
            bench(f"topk_encode tile {R}x{N}", lambda: _C.topk_encode(xs.next(), W_enc, b_enc, b_dec, k, R, N))
        return
    x = xs.items[0]
    vals, idx = _C.topk_encode(x, W_enc, b_enc, b_dec, k)
    g = torch.randn(B, d, dtype=cfg.dtype, generator=torch.Generator().manual_seed(3))
    xc = x - b_dec
    m, v = torch.zeros_like(W_dec), torch.zeros_like(W_dec)
    grad = torch.randn(n, d, dtype=cfg.dtype, generator=torch.Generator().manual_seed(7)) * 1e-3
    torch_encode = get_backend("torch").encode
    bench("topk_encode (fused)", lambda: _C.topk_encode(xs.next(), W_enc, b_enc, b_dec, k))
    bench("gather_accumulate", lambda: _C.gather_accumulate(vals, idx, W_dec))
    bench("transpose_reduce", lambda: _C.transpose_reduce(vals, idx, xc, n, None))
    bench("transpose_reduce + sddmm (fused)", lambda: _C.transpose_reduce(vals, idx, g, n, W_dec))
    bench("sddmm", lambda: _C.sddmm(g, idx, W_dec))
    bench("decoder_norm_step", lambda: _C.decoder_norm_step(W_dec, grad, m, v, 1, workloads.LR, *workloads.BETAS,
                                                             workloads.EPS))
    bench("torch backend encode (unfused)", lambda: torch_encode(xs.next(), W_enc, b_enc, b_dec, k))
    step = workloads.build_step(cfg, "cpu")
    try:
        step()
        bench("SAE training step (cpu backend)", step)
    finally:
        step.release()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_B, default_d, default_n, default_k, _ = workloads.DEFAULT_SHAPES["cpu"]
    ap.add_argument("--B", type=int, default=default_B)
    ap.add_argument("--d", type=int, default=default_d)
    ap.add_argument("--n", type=int, default=default_n)
    ap.add_argument("--k", type=int, default=default_k)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="benchmarks' quick shape, one rep: a smoke test")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--bench-only", action="store_true")
    ap.add_argument("--tiles", nargs="*", default=None, help="RxN tile shapes of topk_encode to compare")
    a = ap.parse_args()
    if not a.bench_only:
        run_checks()
    if a.check_only:
        return
    B, d, n, k = workloads.DEFAULT_SHAPES["quick"][:4] if a.quick else (a.B, a.d, a.n, a.k)
    cfg = workloads.BenchConfig(device="cpu", B=B, d=d, n=n, k=k, dtype=torch.float32, quick=a.quick,
                                backends=("cpu",))
    run_bench(cfg, 1 if a.quick else a.reps, a.tiles)


if __name__ == "__main__":
    main()
