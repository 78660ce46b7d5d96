"""Micro-benchmark and correctness check of the CPU kernels in ``dlmscope._C``.

    python scripts/cpu_kernel_bench.py                 # correctness (float64 + float32) then timings
    python scripts/cpu_kernel_bench.py --check-only
    python scripts/cpu_kernel_bench.py --bench-only --reps 7 --B 4096 --d 512 --n 16384 --k 32
    python scripts/cpu_kernel_bench.py --tiles 256x512 128x1024   # tune topk_encode tile shapes
    python scripts/cpu_kernel_bench.py --bench-only --grouped --reps 3  # six SAEs (paper sweep) off one input

Every time is printed as a multiple of the bare encoder GEMM ``x @ W_enc.T`` measured in the same run, interleaved
with the op (one GEMM right before every op measurement), so that a noisy shared machine affects both alike; the
ratio reported is median(op) / median(GEMM) (and min/min). ``step`` emulates a whole SAE training step on the
primitives (encode, decode, MSE, backward with dx, fused decoder backward, decoder_norm_step, fused Adam on the
encoder parameters).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dlmscope import _C  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# plain-torch oracles
def ref_pre(x, W, be, bd):
    return (x - bd) @ W.T + be


def ref_gather(coef, idx, W):
    return (coef.unsqueeze(-1) * W[idx]).sum(1)


def ref_transpose(coef, idx, X, n):
    d = X.shape[1]
    out = X.new_zeros(n, d).index_add_(0, idx.reshape(-1), (coef.unsqueeze(-1) * X.unsqueeze(1)).reshape(-1, d))
    cs = coef.new_zeros(n).index_add_(0, idx.reshape(-1), coef.reshape(-1))
    return out, cs


def ref_sddmm(G, idx, W):
    return (W[idx] * G.unsqueeze(1)).sum(-1)


def ref_decoder_norm_step(W, grad, m, v, step, lr, b1, b2, eps):
    w_hat = W / W.norm(dim=-1, keepdim=True)
    g = grad - (grad * w_hat).sum(-1, keepdim=True) * w_hat
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(eps)
    W.addcdiv_(m, denom, value=-lr / (1 - b1**step))
    W.copy_(W / W.norm(dim=-1, keepdim=True))


# ---------------------------------------------------------------------------------------------------------------------
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
        x = torch.randn(B, d, dtype=dtype, generator=gen)
        W = torch.randn(n, d, dtype=dtype, generator=gen) / d**0.5
        be = torch.randn(n, dtype=dtype, generator=gen) * 0.1
        if neg > 0:
            mask = torch.rand(n, generator=gen) < neg
            be[mask] -= 100.0
        bd = torch.randn(d, dtype=dtype, generator=gen) * 0.1
        vals, idx = _C.topk_encode(x, W, be, bd, k, R, N)
        assert vals.shape == (B, k) and idx.shape == (B, k) and idx.dtype == torch.int64 and vals.dtype == dtype
        pre = torch.relu(ref_pre(x, W, be, bd))
        rv, _ = pre.topk(k, dim=-1)
        got_sorted = vals.sort(-1, descending=True).values
        assert torch.allclose(got_sorted, rv, atol=tol, rtol=tol), (B, d, n, k, (got_sorted - rv).abs().max())
        assert bool((idx >= 0).all()) and bool((idx < n).all())
        assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all()), "indices not distinct within a row"
        assert torch.allclose(pre.gather(1, idx), vals, atol=tol, rtol=tol), "values != relu(pre) at indices"
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
    """topk_encode_grouped vs plain torch per segment; ids global; aux only masked latents (zero padding)."""
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
        x = torch.randn(B, d, dtype=dtype, generator=gen)
        W = torch.randn(S, d, dtype=dtype, generator=gen) / d**0.5
        be = torch.randn(S, dtype=dtype, generator=gen) * 0.1
        if neg > 0:
            be[torch.rand(S, generator=gen) < neg] -= 100.0
        bd = torch.randn(d, dtype=dtype, generator=gen) * 0.1
        if mask_kind is None:
            mask = None
        else:
            mask = {"rand": torch.rand(S, generator=gen) < 0.3, "all": torch.ones(S, dtype=torch.bool),
                    "none": torch.zeros(S, dtype=torch.bool)}[mask_kind]
        v, i, av, ai = _C.topk_encode_grouped(x, W, be, bd, ks, sizes, mask, k_aux or [], R, N)
        assert v.dtype == dtype and i.dtype == torch.int64 and v.shape == (B, sum(ks))
        assert av.shape == (B, sum(k_aux) if mask is not None else 0) and ai.shape == av.shape
        pre = ref_pre(x, W, be, bd)
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
        assert torch.allclose(got, ref_gather(coef, idx, W), atol=tol, rtol=tol), "gather_accumulate"
        out, cs, sd = _C.transpose_reduce(coef, idx, X, n, None)
        rout, rcs = ref_transpose(coef, idx, X, n)
        assert sd.numel() == 0
        assert torch.allclose(out, rout, atol=tol, rtol=tol) and torch.allclose(cs, rcs, atol=tol, rtol=tol), "tr"
        out2, cs2, sd2 = _C.transpose_reduce(coef, idx, X, n, W)
        assert torch.allclose(out2, out, atol=tol, rtol=tol) and torch.allclose(cs2, cs, atol=tol, rtol=tol), "fused tr"
        assert torch.allclose(sd2, ref_sddmm(X, idx, W), atol=tol, rtol=tol), "fused sddmm"
        assert torch.allclose(_C.sddmm(X, idx, W), ref_sddmm(X, idx, W), atol=tol, rtol=tol), "sddmm"
        # determinism
        out3, _, _ = _C.transpose_reduce(coef, idx, X, n, None)
        assert torch.equal(out3, out)
    print(f"  gather/transpose/sddmm {str(dtype):10s} ok")


def check_decoder_norm(dtype, gen):
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    n, d = 37, 129
    W = torch.randn(n, d, dtype=dtype, generator=gen)
    W /= W.norm(dim=-1, keepdim=True)
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    W2, m2, v2 = W.clone(), m.clone(), v.clone()
    for step in range(1, 5):
        grad = torch.randn(n, d, dtype=dtype, generator=gen)
        g0 = grad.clone()
        _C.decoder_norm_step(W, grad, m, v, step, 1e-2, 0.9, 0.999, 1e-8)
        ref_decoder_norm_step(W2, grad, m2, v2, step, 1e-2, 0.9, 0.999, 1e-8)
        assert torch.equal(grad, g0), "grad modified"
        for a, b, name in ((W, W2, "W"), (m, m2, "exp_avg"), (v, v2, "exp_avg_sq")):
            assert torch.allclose(a, b, atol=tol, rtol=1e-5 if dtype == torch.float32 else 1e-10), name
    print(f"  decoder_norm_step  {str(dtype):14s} ok")


def run_checks():
    print("correctness vs plain torch:")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        check_topk(dtype, gen)
        check_grouped(dtype, gen)
        check_sparse(dtype, gen)
        check_decoder_norm(dtype, gen)


# ---------------------------------------------------------------------------------------------------------------------
def _t(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


class Bench:
    def __init__(self, gemm, reps):
        self.gemm, self.reps, self.rows = gemm, reps, []

    def __call__(self, name, f, setup=None):
        gs, ts = [], []
        for _ in range(self.reps):
            gs.append(_t(self.gemm))
            if setup is not None:
                setup()
            ts.append(_t(f))
        gm, tm = statistics.median(gs), statistics.median(ts)
        self.rows.append((name, tm, tm / gm, min(ts) / min(gs)))
        print(f"  {name:34s} {tm * 1e3:9.1f} ms   {tm / gm:6.3f}x GEMM (median)   {min(ts) / min(gs):6.3f}x (min/min)",
              flush=True)
        return tm / gm


def run_bench(B, d, n, k, reps, tiles):
    torch.manual_seed(0)
    dt = torch.float32
    x = torch.randn(B, d, dtype=dt)
    W_dec = torch.randn(n, d, dtype=dt)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_enc = W_dec.clone()
    b_enc = torch.randn(n, dtype=dt) * 0.01
    b_dec = torch.randn(d, dtype=dt) * 0.1
    gemm = lambda: x @ W_enc.T  # noqa: E731
    for _ in range(2):
        gemm()
    gm = statistics.median(_t(gemm) for _ in range(3))
    print(f"\nB={B} d={d} n={n} k={k} float32, threads={torch.get_num_threads()}; bare GEMM x @ W_enc.T ≈ {gm:.3f} s")
    bench = Bench(gemm, reps)
    if tiles:
        for tile in tiles:
            R, N = map(int, tile.split("x"))
            bench(f"topk_encode tile {R}x{N}", lambda: _C.topk_encode(x, W_enc, b_enc, b_dec, k, R, N))
        return
    vals, idx = _C.topk_encode(x, W_enc, b_enc, b_dec, k)
    g = torch.randn(B, d, dtype=dt)
    xc = x - b_dec
    m, v = torch.zeros_like(W_dec), torch.zeros_like(W_dec)
    grad = torch.randn_like(W_dec)
    bench("topk_encode (fused)", lambda: _C.topk_encode(x, W_enc, b_enc, b_dec, k))
    bench("gather_accumulate", lambda: _C.gather_accumulate(vals, idx, W_dec))
    bench("transpose_reduce", lambda: _C.transpose_reduce(vals, idx, xc, n, None))
    bench("transpose_reduce + sddmm (fused)", lambda: _C.transpose_reduce(vals, idx, g, n, W_dec))
    bench("sddmm", lambda: _C.sddmm(g, idx, W_dec))
    bench("decoder_norm_step", lambda: _C.decoder_norm_step(W_dec, grad, m, v, 1, 1e-4, 0.9, 0.999, 1e-8))
    bench("torch: addmm+relu+topk (unfused)", lambda: torch.relu_(torch.addmm(b_enc, xc, W_enc.T)).topk(k, dim=-1))

    # a whole training step on the primitives
    params = [W_enc, b_enc, b_dec]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)
    state = {"step": 0}

    def step():
        vals, idx = _C.topk_encode(x, W_enc, b_enc, b_dec, k)
        x_hat = _C.gather_accumulate(vals, idx, W_dec)
        x_hat += b_dec
        err = x_hat - x
        _ = err.pow(2).mean()
        g = err.mul_(2.0 / err.numel())
        dW_dec, _, d_vals = _C.transpose_reduce(vals, idx, g, n, W_dec)
        db_dec = g.sum(0)
        d_pre = torch.where(vals > 0, d_vals, torch.zeros_like(d_vals))
        dx = _C.gather_accumulate(d_pre, idx, W_enc)
        dW_enc, db_enc, _ = _C.transpose_reduce(d_pre, idx, x - b_dec, n, None)
        db_dec -= dx.sum(0)
        W_enc.grad, b_enc.grad, b_dec.grad = dW_enc, db_enc, db_dec
        state["step"] += 1
        _C.decoder_norm_step(W_dec, dW_dec, m, v, state["step"], 1e-4, 0.9, 0.999, 1e-8)
        opt.step()

    step()
    bench("SAE training step (primitives)", step)


def run_grouped_bench(B, d, n, ks, k_aux, aux_fraction, reps):
    """The paper's sweep: len(ks) SAEs of n latents off one input; fused grouped encode vs separate encodes vs the
    bare GEMM over all stacked latents; with AuxK, fused vs the unfused composite (two encodes per SAE)."""
    from dlmscope.backends import get_backend
    from dlmscope.backends.base import Backend

    torch.manual_seed(0)
    G = len(ks)
    S = n * G
    x = torch.randn(B, d)
    W_all = F.normalize(torch.randn(S, d), dim=1)
    b_all = torch.randn(S) * 0.01
    b_dec = torch.randn(d) * 0.1
    sizes = [n] * G
    mask = torch.rand(S) < aux_fraction
    kas = [k_aux] * G
    cpu = get_backend("cpu")
    gemm = lambda: x @ W_all.T  # noqa: E731
    gemm()
    print(f"\ngrouped: B={B} d={d} {G} SAEs x n={n} (S={S}) ks={ks}; AuxK k_aux={k_aux} on {mask.float().mean():.0%} "
          f"of latents; threads={torch.get_num_threads()}; every ratio over the bare GEMM x @ W_all.T (S latents)")
    variants = {
        "gemm": gemm,
        "gemm_per_sae": lambda: [x @ W_all[g * n:(g + 1) * n].T for g in range(G)],
        "fused": lambda: _C.topk_encode_grouped(x, W_all, b_all, b_dec, ks, sizes),
        "separate": lambda: [_C.topk_encode(x, W_all[g * n:(g + 1) * n], b_all[g * n:(g + 1) * n], b_dec, k)
                             for g, k in enumerate(ks)],
        "fused_aux": lambda: _C.topk_encode_grouped(x, W_all, b_all, b_dec, ks, sizes, mask, kas),
        "composite_aux": lambda: Backend.encode_grouped(cpu, x, W_all, b_all, b_dec, ks, sizes, mask, kas),
    }
    labels = {"gemm": "bare GEMM x @ W_all.T", "gemm_per_sae": f"{G} GEMMs x @ W_g.T (one per SAE)",
              "fused": "grouped fused (one GEMM pass)", "separate": f"{G} separate topk_encode",
              "fused_aux": "grouped fused + AuxK", "composite_aux": "composite + AuxK (2 encodes/SAE)"}
    # Round-robin: every rep times every variant once (order rotated per rep), so a noisy neighbour hits all of them
    # alike; ratios are medians of the per-rep ratios (paired), plus min/min.
    names = list(variants)
    times = {v: [] for v in names}
    for rep in range(reps):
        for v in names[rep % len(names):] + names[:rep % len(names)]:
            times[v].append(_t(variants[v]))
    g = times["gemm"]
    for v in names:
        ts = times[v]
        paired = statistics.median(t / gg for t, gg in zip(ts, g))
        print(f"  {labels[v]:34s} {statistics.median(ts) * 1e3:9.1f} ms   {paired:6.3f}x GEMM (median of paired)   "
              f"{min(ts) / min(g):6.3f}x (min/min)", flush=True)

    def pair(a, b):
        return (statistics.median(x / y for x, y in zip(times[a], times[b])), min(times[a]) / min(times[b]))

    for a, b in (("separate", "fused"), ("composite_aux", "fused_aux"), ("fused_aux", "fused")):
        med, mn = pair(a, b)
        print(f"  => {a} / {b} = {med:.2f}x (median of paired)  {mn:.2f}x (min/min)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--bench-only", action="store_true")
    ap.add_argument("--grouped", action="store_true",
                    help="bench the grouped encoder on the paper's sweep (six SAEs of --n latents, --ks, --k-aux)")
    ap.add_argument("--ks", type=int, nargs="*", default=[50, 80, 160, 320, 520, 820])
    ap.add_argument("--k-aux", type=int, default=256)
    ap.add_argument("--aux-fraction", type=float, default=0.3)
    ap.add_argument("--tiles", nargs="*", default=None, help="RxN tile shapes of topk_encode to compare")
    a = ap.parse_args()
    if not a.bench_only:
        run_checks()
    if a.check_only:
        return
    if a.grouped:
        run_grouped_bench(a.B, a.d, a.n, a.ks, a.k_aux, a.aux_fraction, a.reps)
    else:
        run_bench(a.B, a.d, a.n, a.k, a.reps, a.tiles)


if __name__ == "__main__":
    main()
