#!/usr/bin/env python
"""Ahead-of-time compile of the Top-K selection kernels for sm_90 (H100/H200), no GPU needed: registers, spills,
shared memory and whether the MMA is Hopper's warp-group MMA, per configuration.

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0     # the triton of the GPU stack we target
    /tmp/t36/bin/pip install torch==2.13.0 numpy safetensors tqdm     # what `import dlmscope` needs
    PYTHONPATH=. /tmp/t36/bin/python benchmarks/sm90_encoder_compile.py \\
        [--out benchmarks/results/sm90-encoder-compile.md] [--candidates] [--no-variants]

Rows, by kind:
  ``shipped``  what runs on CUDA: the fused encoder at ``_launch.cuda_tile`` for every KP (next power of two >= k)
               up to ``_launch.fused_max_kp`` (above it topk_encode is mm + the select) and dtype, with the key width ``encode_config`` picks (int32 for bf16 / fp16, int64 for fp32) and
               the one-reduction compare-and-swap; the threshold-then-compact select at ``cuda_select_config``.
  ``variant``  the same bf16 tiles with the two-reduction compare-and-swap (``DLMSCOPE_ENCODE_ONE_RED=0``) and
               with int64 keys (``DLMSCOPE_ENCODE_KEYS=64``: the epilogue before the 32-bit keys), and KP = 1024
               fused (why k > 512 is routed to the select).
  ``candidate`` (``--candidates``) Hopper-shaped tiles for the GPU sweep (not used until measured faster).
Exit status 1 when a shipped configuration fails to compile, spills, or — a 16-bit encoder whose row block is at
least a warp group's 64 rows — does not use warp-group MMA (fp32 with exact products has no tensor-core path;
row blocks below 64 use mma.sync by construction). The register budget is checked here, not guessed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dlmscope.kernels import _launch

KPS = (8, 16, 32, 64, 128, 256, 512, 1024)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CANDIDATES = [(64, t) for t in ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                                 (128, 256, 64, 16, 3), (64, 256, 64, 8, 3))] + \
    [(256, (64, 256, 32, 8, 3)), (512, (32, 512, 32, 8, 2))]
SELECT_C = 16384  # the chunked encoder's default chunk


def _compile(fn, sig: dict, const: dict, warps: int, stages: int) -> dict:
    sig = {**sig, **{c: "constexpr" for c in const}}
    src = ASTSource(fn=fn, signature={a: sig[a] for a in fn.arg_names}, constexprs=const)
    t0 = time.perf_counter()
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = k.asm.get("ptx", "")
    return {**_ptxas_usage(ptx), "shared_bytes": k.metadata.shared, "wgmma": "wgmma" in ptx,
            "compile_s": round(time.perf_counter() - t0, 1)}


def encoder_row(KP: int, tile: tuple, dtype: str, keys: int, one_red: bool) -> dict:
    BLOCK_B, BLOCK_N, BLOCK_D, warps, stages = tile
    fn = importlib.import_module("dlmscope.kernels.topk_encode")._topk_encode_kernel
    index_bits = 23 - _launch.KEY32_KEPT_BITS.get(DTYPES[dtype], 8) if keys == 32 else 0
    sig = dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", cand_ptr=f"*i{keys}", B="i32", N="i32",
               D="i32", n_per_split="i32", num_splits="i32", stride_xb="i32", stride_wn="i32")
    const = dict(KP=KP, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, GROUP_B=8, INPUT_PRECISION="ieee",
                 DOT_FP32=False, LOG_B=_launch.log2(BLOCK_B), LOG_N=_launch.log2(BLOCK_N), LOG_K=_launch.log2(KP),
                 INDEX_BITS=index_bits, ONE_RED=one_red)
    row = {"kernel": "encode", "KP": KP, "tile": f"{BLOCK_B}x{BLOCK_N}x{BLOCK_D}", "warps": warps, "stages": stages,
           "dtype": dtype, "keys": f"i{keys}", "cas": "1-red" if one_red else "2-red"}
    return {**row, **_compile(fn, sig, const, warps, stages)}


def select_row(dtype: str) -> dict:
    cfg = _launch.cuda_select_config(SELECT_C)
    mod = importlib.import_module("dlmscope.kernels.topk_select")
    sig = dict(pre_ptr=f"*{dtype}", bias_ptr=f"*{dtype}", val_ptr="*fp32", idx_ptr="*i64", C="i32", k="i32",
               id_offset="i32", stride_pre="i32", stride_val="i32", stride_idx="i32")
    const = dict(HAS_BIAS=True, BLOCK_C=cfg.BLOCK_C, RADIX=mod.RADIX, PASSES=mod.PASSES)
    row = {"kernel": "select", "KP": "-", "tile": f"1x{cfg.BLOCK_C}", "warps": cfg.num_warps, "stages": 1,
           "dtype": dtype, "keys": "-", "cas": "-"}
    return {**row, **_compile(mod._topk_select_kernel, sig, const, cfg.num_warps, 1)}


def _ptxas_usage(ptx: str) -> dict:
    """Registers per thread and spilled bytes from ``ptxas -v`` on the kernel's PTX (triton's own ptxas; the
    compiled kernel's ``n_regs`` is only filled in when a GPU loads it), and static SASS counts from
    ``cuobjdump -sass``: instructions, warp shuffles and barriers — the epilogue's cost where registers are at
    the 255 cap (the bitonic networks are unrolled, so static counts scale with the work per tile)."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([os.path.join(bindir, "ptxas"), "-v", "--gpu-name", "sm_90a", path, "-o", cubin],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    instr = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([A-Z][A-Z0-9_.]*)", sass)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"n_regs": int(re.search(r"Used (\d+) registers", out).group(1)),
            "n_spills": int(spill.group(1)) if spill else 0, "sass": len(instr),
            "shfl": sum(op.startswith("SHFL") for op in instr), "bar": sum(op.startswith("BAR") for op in instr)}


def jobs(candidates: bool, variants: bool) -> list[tuple]:
    """(kind, builder, args) for every row of the report."""
    out = []
    for KP in KPS:
        for dt, torch_dt in DTYPES.items():
            if KP > _launch.fused_max_kp(torch_dt):     # there topk_encode is the chunked GEMM + select
                continue
            keys = 32 if _launch.key32_max_index_bits(torch_dt) else 64
            out.append(("shipped", encoder_row, (KP, _launch.cuda_tile(KP, torch_dt), dt, keys, True)))
    out += [("shipped", select_row, (dt,)) for dt in DTYPES]
    if variants:
        for KP in KPS:
            if KP <= _launch.fused_max_kp(torch.bfloat16):
                tile = _launch.cuda_tile(KP, torch.bfloat16)
                out.append(("variant", encoder_row, (KP, tile, "bf16", 32, False)))
                out.append(("variant", encoder_row, (KP, tile, "bf16", 64, False)))
        # the largest KP as the fused kernel (not shipped: topk_encode routes it to the select)
        out.append(("variant", encoder_row, (1024, (16, 1024, 16, 16, 1), "bf16", 32, True)))
    if candidates:
        out += [("candidate", encoder_row, (KP, tile, "bf16", 32, True)) for KP, tile in CANDIDATES]
    return out


def failures(rows: list[dict]) -> list[dict]:
    """Shipped rows that fail to compile, spill, or lose warp-group MMA where it is expected."""
    def wgmma_expected(r):
        return r["kernel"] == "encode" and r["dtype"] != "fp32" and int(r["tile"].split("x")[0]) >= 64
    return [r for r in rows if r["kind"] == "shipped"
            and ("error" in r or r["n_spills"] or (wgmma_expected(r) and not r["wgmma"]))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/sm90-encoder-compile.md")
    ap.add_argument("--candidates", action="store_true")
    ap.add_argument("--no-variants", action="store_true")
    a = ap.parse_args(argv)
    for env in (_launch.KEYS_ENV, _launch.ONE_RED_ENV, _launch.TILE_ENV):  # report the defaults, not overrides
        os.environ.pop(env, None)
    rows = []
    for kind, build, args in jobs(a.candidates, not a.no_variants):
        try:
            row = build(*args)
        except Exception as exc:                                   # a config that does not compile is a result
            row = {"kernel": build.__name__, "args": repr(args), "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        row["kind"] = kind
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ("kind", "kernel", "KP", "tile", "warps", "stages", "dtype", "keys", "cas")
    lines = [f"# Top-K selection kernels compiled for sm_90 (triton {triton.__version__}, no GPU)", "",
             "`benchmarks/sm90_encoder_compile.py` — ptxas registers per thread, spilled bytes, shared memory per "
             "block, and whether the PTX uses warp-group MMA (`wgmma`). 255 registers is the per-thread maximum. `keys`: the "
             "fused encoder's sort key (i32: value bits + split-local index, i64: value bits << 32 | index); "
             "`cas`: compare-and-swap with one reduction (partner = pair sum - self) or two (min + max). "
             "`select`: the threshold-then-compact select of the chunked encoder (k >= 256).", "",
             "`sass` / `shfl` / `bar`: static SASS instructions, warp shuffles and barriers (cuobjdump) — the cost "
             "of the unrolled networks where registers sit at the cap. Before / after the 32-bit keys: the "
             "`variant … i64 2-red` rows are the previous epilogue at the same tiles (for KP <= 256 equal to the "
             "report before it: 168–220 registers at KP <= 128, spills at KP >= 256 and for fp32).", "",
             "| " + " | ".join(cols) + " | regs | spills (B) | shared (KB) | wgmma | sass | shfl | bar | compile (s) |",
             "|" + "---|" * (len(cols) + 8)]
    for r in rows:
        head = " | ".join(str(r.get(c, "")) for c in cols)
        if "error" in r:
            lines.append(f"| {head} | error: {r['error']} | | | | | | | |")
        else:
            lines.append(f"| {head} | {r['n_regs']} | {r['n_spills']} | {r['shared_bytes'] / 1024:.0f} | "
                         f"{'yes' if r['wgmma'] else 'no'} | {r['sass']} | {r['shfl']} | {r['bar']} | {r['compile_s']} |")
    bad = failures(rows)
    lines += ["", f"Shipped configurations failing (spills, no wgmma where expected, errors): {len(bad)}."]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump({"triton": triton.__version__, "rows": rows}, f, indent=2)
    for r in bad:
        print("shipped config spills, fails or has no wgmma:", r, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
