#!/usr/bin/env python
"""Ahead-of-time compile of the fused Top-K encoder for sm_90 (H100/H200), no GPU needed: registers, spills,
shared memory and whether the MMA is Hopper's warp-group MMA, per configuration.

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0     # the lent GPU machine's triton
    /tmp/t36/bin/pip install torch==2.13.0 numpy safetensors tqdm     # what `import dlmscope` needs
    PYTHONPATH=. /tmp/t36/bin/python scripts/sm90_report.py \
        [--out benchmarks/results/sm90-encoder-compile.md] [--candidates]

``shipped``: the tiles ``dlmscope.kernels._launch.encode_config`` uses on CUDA for each KP (next power of two
≥ k), bf16 for every KP and fp16 / fp32 at KP = 64. ``--candidates`` adds Hopper-shaped tiles for the GPU
sweep (they are not used until measured faster). Exit status 1 when a shipped configuration spills or does not
use warp-group MMA (16-bit dtypes; fp32 with exact products has no tensor-core path): the kernels' register
budget is checked here, not guessed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SHIPPED = [(KP, (64, 128, 32, 8, 3)) for KP in (8, 16, 32, 64, 128)] + [(256, (32, 256, 32, 8, 3))] + \
    [(KP, (16, KP, 32, 16, 2)) for KP in (512, 1024)]
CANDIDATES = [(64, t) for t in ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                                 (128, 256, 64, 16, 3), (64, 256, 64, 8, 3))]
DTYPES = {"bf16": ("bf16", "ieee"), "fp16": ("fp16", "ieee"), "fp32": ("fp32", "ieee")}


def compile_encoder(KP: int, tile: tuple, dtype: str) -> dict:
    BLOCK_B, BLOCK_N, BLOCK_D, warps, stages = tile
    dt, precision = DTYPES[dtype]
    fn = importlib.import_module("dlmscope.kernels.topk_encode")._topk_encode_kernel
    sig = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", cand_ptr="*i64", B="i32", N="i32", D="i32",
               n_per_split="i32", num_splits="i32", stride_xb="i32", stride_wn="i32")
    const = dict(KP=KP, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, GROUP_B=8, INPUT_PRECISION=precision,
                 DOT_FP32=False, LOG_B=int(math.log2(BLOCK_B)), LOG_N=int(math.log2(BLOCK_N)),
                 LOG_K=int(math.log2(KP)))
    sig.update({c: "constexpr" for c in const})
    src = ASTSource(fn=fn, signature={a: sig[a] for a in fn.arg_names}, constexprs=const)
    t0 = time.perf_counter()
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = k.asm.get("ptx", "")
    regs, spills = _ptxas_usage(ptx)
    return {"KP": KP, "tile": f"{BLOCK_B}x{BLOCK_N}x{BLOCK_D}", "warps": warps, "stages": stages, "dtype": dtype,
            "n_regs": regs, "n_spills": spills, "shared_bytes": k.metadata.shared,
            "wgmma": "wgmma" in ptx, "compile_s": round(time.perf_counter() - t0, 1)}


def _ptxas_usage(ptx: str) -> tuple[int, int]:
    """``(registers per thread, spilled bytes)`` from ``ptxas -v`` on the kernel's PTX (triton's own ptxas;
    the compiled kernel's ``n_regs`` is only filled in when a GPU loads it)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores", out)
    return regs, int(spill.group(1)) if spill else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/sm90-encoder-compile.md")
    ap.add_argument("--candidates", action="store_true")
    a = ap.parse_args(argv)
    jobs = [("shipped", KP, tile, "bf16") for KP, tile in SHIPPED]
    jobs += [("shipped", 64, SHIPPED[3][1], dt) for dt in ("fp16", "fp32")]
    if a.candidates:
        jobs += [("candidate", KP, tile, "bf16") for KP, tile in CANDIDATES]
    rows = []
    for kind, KP, tile, dt in jobs:
        try:
            row = compile_encoder(KP, tile, dt)
        except Exception as exc:                                   # a config that does not compile is a result
            row = {"KP": KP, "tile": "x".join(map(str, tile[:3])), "warps": tile[3], "stages": tile[4], "dtype": dt,
                   "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        row["kind"] = kind
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"# Fused Top-K encoder compiled for sm_90 (triton {triton.__version__}, no GPU)", "",
             "`scripts/sm90_report.py` — ptxas registers per thread, spilled bytes, shared memory per block, and "
             "whether the PTX uses warp-group MMA (`wgmma`). 255 registers is the per-thread maximum.", "",
             "| kind | KP | tile B×N×D | warps | stages | dtype | regs | spills (B) | shared (KB) | wgmma |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['KP']} | {r['tile']} | {r['warps']} | {r['stages']} | {r['dtype']} | "
                         f"error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['kind']} | {r['KP']} | {r['tile']} | {r['warps']} | {r['stages']} | {r['dtype']} | "
                         f"{r['n_regs']} | {r['n_spills']} | {r['shared_bytes'] / 1024:.0f} | {'yes' if r['wgmma'] else 'no'} |")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump({"triton": triton.__version__, "rows": rows}, f, indent=2)
    # fp32 with exact (ieee) products has no tensor-core MMA; 16-bit configurations must use warp-group MMA
    bad = [r for r in rows if r["kind"] == "shipped" and ("error" in r or r["n_spills"]
                                                          or (not r["wgmma"] and r["dtype"] != "fp32"))]
    for r in bad:
        print("shipped config spills, fails or has no wgmma:", r, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
