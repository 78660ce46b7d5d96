#!/usr/bin/env python
"""Encoder choices measured, not guessed: the fused Triton encoder at the shipped tile and at Hopper-shaped
tiles (``DLMSCOPE_ENCODE_TILE``), the ``chunked`` GEMM + per-chunk top-k encoder at a few chunk sizes, and the
plain ``torch`` encoder, against the bare GEMM, at the target shape (stage 3 of ``scripts/gpu_check.sh``).

    python benchmarks/encode_sweep.py --out DIR [--shape B,d,n,k] [--dtype bf16] [--dry]

Timing: CUDA events around each call, median of ``--rounds`` after a warm-up (the first call compiles);
TFLOP/s counts the GEMM's 2·B·d·n. Each variant is also checked against the torch encoder on the first 64
rows (value error relative to the row's top value). Then the fused encoder's epilogue switches (int64 keys,
min+max compare-and-swap) at the shipped tile, and every encoder at the large k of the paper (256, 820). Writes ``encode_sweep.json`` / ``.md`` after every variant,
so a run cut short keeps what it measured. ``--dry`` runs a small shape on the CPU (torch and chunked only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import dlmscope  # noqa: E402

TILES = ("", "128,128,64,8,3", "128,128,64,8,4", "128,256,64,8,3", "64,256,64,8,3")   # "" = the shipped tile
CHUNKS = (8192, 16384, 32768)
#: the fused encoder's epilogue switches (A/B at the shipped tile): int64 keys instead of 32-bit, min+max
#: compare-and-swap instead of one reduction
EPILOGUES = ({"DLMSCOPE_ENCODE_KEYS": "64"}, {"DLMSCOPE_ENCODE_ONE_RED": "0"})
LARGE_K = (256, 820)   # the paper's k range ends at 820: fused (routed to chunks + select above KP 512) vs the rest


def _timer(device):
    if device.type == "cuda":
        def run(fn, rounds):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(rounds):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            return statistics.median(times)
    else:
        def run(fn, rounds):
            fn()
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
    return run


def _resources(variant: str, x, W, b_enc, b_dec, k: int) -> dict:
    """Registers and spills of the fused encoder kernel a triton variant runs (on a GPU): one more launch of it
    under the same settings (triton's cache hands back the kernel the timed calls compiled). Empty where
    ``topk_encode`` routes k to the chunked select (no fused kernel) or under the interpreter."""
    if variant != "triton":
        return {}
    try:
        from dlmscope.kernels import _launch, topk_candidates

        if _launch.next_pow2(k) > _launch.fused_max_kp(x.dtype):      # topk_encode's own routing rule
            return {}
        _, _, compiled = topk_candidates((x - b_dec).contiguous(), W, b_enc, k, return_compiled=True)
        return {"n_regs": int(compiled.n_regs), "n_spills": int(compiled.n_spills)}
    except Exception:                               # no triton, the interpreter, or an older triton
        return {}


def _write(out, result):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "encode_sweep.json"), "w") as f:
        json.dump(result, f, indent=2)
    B, d, n, k = result["shape"]
    lines = [f"# Encoder sweep ({result['device']}, {result['gpu']}, {result['dtype']}, B={B} d={d} n={n} k={k})", "",
             "| variant | setting | k | median | × GEMM | TFLOP/s | max rel value error | regs | spills |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    gemm = next((r["seconds"] for r in result["rows"] if r["variant"] == "gemm"), None)
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['setting']} | {r.get('k', '')} | error: {r['error']} | | | | | |")
            continue
        ratio = f"{r['seconds'] / gemm:.2f}×" if gemm else ""
        err = f"{r['value_error']:.2g}" if r.get("value_error") is not None else ""
        lines.append(f"| {r['variant']} | {r['setting']} | {r.get('k', '')} | {r['seconds'] * 1e3:.2f} ms | {ratio} | "
                     f"{r['tflops']:.1f} | {err} | {r.get('n_regs', '')} | {r.get('n_spills', '')} |")
    with open(os.path.join(out, "encode_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default=None, help="B,d,n,k (default 16384,4096,131072,64; dry 512,64,4096,16)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dry", action="store_true")
    a = ap.parse_args(argv)
    device = torch.device("cpu" if a.dry else "cuda")
    B, d, n, k = (int(v) for v in (a.shape or ("512,64,4096,16" if a.dry else "16384,4096,131072,64")).split(","))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype or ("fp32" if a.dry else "bf16")]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, d, generator=gen, device=device).to(dtype)
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, device=device), dim=1).to(dtype)
    b_enc = (0.01 * torch.randn(n, generator=gen, device=device)).to(dtype)
    b_dec = (0.1 * torch.randn(d, generator=gen, device=device)).to(dtype)
    timer = _timer(device)
    flops = 2 * B * d * n
    ref_v = dlmscope.topk_encode(x[:64], W, b_enc, b_dec, k, backend="torch")[0].double().sort(-1).values
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none",
              "dtype": str(dtype).replace("torch.", ""), "shape": [B, d, n, k], "rows": []}

    refs = {k: ref_v}

    def measure(variant, setting, fn, env=None, kk=k):
        old = {key: os.environ.get(key) for key in (env or {})}
        os.environ.update(env or {})
        try:
            seconds = timer(fn, a.rounds)
            err = None
            if variant != "gemm":
                if kk not in refs:
                    refs[kk] = dlmscope.topk_encode(x[:64], W, b_enc, b_dec, kk, backend="torch")[0].double().sort(-1).values
                v = fn_rows(variant, kk)[0].double().sort(-1).values
                err = float(((v - refs[kk]).abs() / refs[kk][:, -1:].abs().clamp_min(1e-12)).max())
            row = {"variant": variant, "setting": setting, "k": kk, "seconds": seconds,
                   "tflops": flops / seconds / 1e12, "value_error": err,
                   **_resources(variant, x, W, b_enc, b_dec, kk)}
        except Exception as exc:                            # a variant that fails is a result, not the end
            row = {"variant": variant, "setting": setting, "k": kk, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            for key, value in old.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        result["rows"].append(row)
        _write(a.out, result)
        print(json.dumps(row), flush=True)

    def fn_rows(variant, kk):
        backend = {"triton": "triton", "chunked": "chunked", "cuda": "cuda", "torch": "torch"}[variant]
        return dlmscope.topk_encode(x[:64], W, b_enc, b_dec, kk, backend=backend)

    measure("gemm", "x @ W.T", lambda: torch.mm(x, W.T))
    if "triton" in dlmscope.available_backends() and not a.dry:
        for tile in TILES:
            measure("triton", tile or "shipped", lambda: dlmscope.topk_encode(x, W, b_enc, b_dec, k, backend="triton"),
                    env={"DLMSCOPE_ENCODE_TILE": tile, "DLMSCOPE_AUTOTUNE": "0"} if tile else {"DLMSCOPE_AUTOTUNE": "0"})
    for chunk in CHUNKS if not a.dry else (512, 1024):
        measure("chunked", f"chunk {chunk}", lambda: dlmscope.topk_encode(x, W, b_enc, b_dec, k, backend="chunked"),
                env={"DLMSCOPE_CHUNK_LATENTS": str(chunk)})
    if "cuda" in dlmscope.available_backends() and not a.dry:
        for chunk in CHUNKS:
            measure("cuda", f"chunk {chunk}", lambda: dlmscope.topk_encode(x, W, b_enc, b_dec, k, backend="cuda"),
                    env={"DLMSCOPE_CHUNK_LATENTS": str(chunk)})
    measure("torch", "addmm + relu + topk", lambda: dlmscope.topk_encode(x, W, b_enc, b_dec, k, backend="torch"))
    if "triton" in dlmscope.available_backends() and not a.dry:
        for env in EPILOGUES:
            measure("triton", "shipped tile, " + ", ".join(f"{key}={v}" for key, v in env.items()),
                    lambda: dlmscope.topk_encode(x, W, b_enc, b_dec, k, backend="triton"),
                    env={**env, "DLMSCOPE_AUTOTUNE": "0"})
    for kk in LARGE_K if not a.dry else ():
        encode = lambda name, kk=kk: dlmscope.topk_encode(x, W, b_enc, b_dec, kk, backend=name)  # noqa: E731
        for name in ("triton", "chunked", "cuda", "torch"):
            if name in dlmscope.available_backends():
                measure(name, f"k={kk}", lambda name=name: encode(name), kk=kk,
                        env={"DLMSCOPE_AUTOTUNE": "0"} if name == "triton" else None)
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
