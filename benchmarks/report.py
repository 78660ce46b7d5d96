#!/usr/bin/env python
"""Run the dlmscope benchmark suite once and write the ratios that matter.

    python benchmarks/report.py [--device cpu|cuda] [--quick] [--out benchmarks/results]
                                [--shape B,d,n,k] [--dtype fp32|bf16] [--backends a,b] [--rounds N] [--warmup N]
                                [--only step|ops] [--timeout SECONDS] [--from-records FILE.jsonl]

Runs ``pytest benchmarks/test_bench_step.py`` then ``benchmarks/test_bench_ops.py`` (each a separate pytest
process with ``--benchmark-json`` and its own timeout; every finished benchmark is also appended to a JSON-lines
record, so a run killed half-way still reports what it measured), then prints and writes

  <out>/<device>-<shape-tag>.json   raw medians (+ min/mean/stddev/rounds), ratios, machine info
  <out>/<device>-<shape-tag>.md     markdown tables ready for the README

Ratios: each step variant / GEMM (same run), dense / each of ours (speed-up), embedding_bag (the ``torch``
backend) / each other backend, and each op: reference / backend.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)  # the repo's dlmscope, also when it is not installed

CPU_TARGET = 1.8  # our CPU step <= 1.8x the bare encoder GEMM (DESIGN.md)
CONTENTION_CORES = 0.25  # other processes using more than this many cores while we time: flag the run
BASELINES = ("gemm", "dense", "dense_compiled")
OP_BASELINES = ("reference", "adam_foreach")
OPS = ("encode", "decode_fwd_bwd", "decoder_norm_step")


# ---- machine info -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def machine_info(device: str) -> dict:
    import torch

    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": _git("rev-parse", "--short", "HEAD") or None,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    try:
        import dlmscope

        info["dlmscope_backends"] = dlmscope.available_backends()
    except Exception as exc:  # noqa: BLE001
        info["dlmscope_backends"] = f"import failed: {exc}"
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_sm_count"] = props.multi_processor_count
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            info["nvidia_smi"] = out.strip()
        except Exception:  # noqa: BLE001
            pass
    return info


# ---- running ----------------------------------------------------------------------------------------


def run_suite(args, cfg, record_path: str, workdir: str) -> dict:
    """Run the selected benchmark files, one pytest process each; return their exit codes."""
    files = {"step": "test_bench_step.py", "ops": "test_bench_ops.py"}
    parts = [args.only] if args.only else ["step", "ops"]
    codes = {}
    for part in parts:
        cmd = [sys.executable, "-m", "pytest", os.path.join("benchmarks", files[part]), "-q",
               "-p", "no:cacheprovider", "-o", "addopts=", "--benchmark-columns=min,median,mean,stddev,rounds",
               f"--benchmark-json={os.path.join(workdir, part + '.json')}", f"--bench-device={cfg.device}",
               f"--bench-shape={cfg.B},{cfg.d},{cfg.n},{cfg.k}", f"--bench-dtype={args.dtype_name}",
               f"--bench-backends={','.join(cfg.backends)}", f"--bench-record={record_path}",
               "--bench-compile" if cfg.compile_dense else "--bench-no-compile"]
        if cfg.quick:
            cmd.append("--bench-quick")
        if args.rounds is not None:
            cmd.append(f"--bench-rounds={args.rounds}")
        if args.warmup is not None:
            cmd.append(f"--bench-warmup={args.warmup}")
        print("+", " ".join(cmd), flush=True)
        t0 = time.time()
        # own process group, so a timeout also ends its children (e.g. torch.compile workers)
        env = dict(os.environ)
        if cfg.device == "cuda":  # variants with very different big buffers follow each other: less fragmentation
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, env=env)
        try:
            codes[part] = proc.wait(timeout=args.timeouts[part])
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            print(f"!! {part} benchmarks hit the {args.timeouts[part]:.0f}s timeout; reporting what finished",
                  flush=True)
            codes[part] = "timeout"
        print(f"== {part}: exit {codes[part]} after {time.time() - t0:.0f}s", flush=True)
    return codes


def load_records(path: str) -> list[dict]:
    rows = []
    if path.endswith(".json"):  # a results file written by this script: re-render its records
        with open(path) as f:
            rows = json.load(f).get("records", [])
    elif os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rows.append(json.loads(line))
    # a variant measured twice (re-runs appended to one record file): keep the last
    latest = {}
    for r in rows:
        latest[(r["group"], r["variant"])] = r
    return list(latest.values())


# ---- ratios -----------------------------------------------------------------------------------------


def _ratio(a, b):
    return (a / b) if (a is not None and b) else None


def compute(records: list[dict], device: str) -> dict:
    step = {r["variant"]: r["median"] for r in records if r["group"] == "step"}
    step_min = {r["variant"]: r["min"] for r in records if r["group"] == "step"}
    ops = {op: {r["variant"]: r["median"] for r in records if r["group"] == op} for op in OPS}
    gemm, dense, emb = step.get("gemm"), step.get("dense"), step.get("torch")
    ours = [v for v in step if v not in BASELINES]
    ratios = {
        "step_over_gemm": {v: _ratio(t, gemm) for v, t in step.items()},
        # the same from the fastest round of each: less sensitive to other processes on a shared machine
        "step_over_gemm_min": {v: _ratio(t, step_min.get("gemm")) for v, t in step_min.items()},
        "dense_over_variant": {v: _ratio(dense, t) for v, t in step.items() if v != "gemm"},
        "embedding_bag_over_variant": {v: _ratio(emb, t) for v in ours if v != "torch" for t in [step[v]]},
        "ops_reference_over_variant": {
            op: {v: _ratio(ops[op].get("reference"), t) for v, t in ops[op].items() if v != "reference"}
            for op in OPS if ops[op]},
        "ops_torch_over_variant": {
            op: {v: _ratio(ops[op].get("torch"), t) for v, t in ops[op].items() if v not in OP_BASELINES + ("torch",)}
            for op in OPS if ops[op]},
    }
    target = None
    if device == "cpu":
        r = ratios["step_over_gemm"].get("cpu")
        target = {"variant": "cpu", "limit_x_gemm": CPU_TARGET, "measured_x_gemm": r,
                  "met": (r is not None and r <= CPU_TARGET)}
    return {"step_medians_s": step, "step_min_s": step_min, "op_medians_s": {op: d for op, d in ops.items() if d}, "ratios": ratios,
            "cpu_target": target}


# ---- rendering --------------------------------------------------------------------------------------


def _fmt_t(t) -> str:
    if t is None:
        return "—"
    if t >= 1:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} µs"


def _fmt_x(r) -> str:
    return "—" if r is None else f"{r:.2f}×"


STEP_LABELS = {
    "gemm": "bare encoder GEMM `x @ W_enc.T` (floor)",
    "dense": "dense plain PyTorch (paper: scatter + matmul, Adam foreach)",
    "dense_compiled": "dense plain PyTorch, `torch.compile`",
    "torch": "dlmscope `torch` backend (embedding_bag / index_add, fused Adam)",
    "cpu": "dlmscope `cpu` backend (C++/OpenMP kernels)",
    "triton": "dlmscope `triton` backend",
    "chunked": "dlmscope `chunked` backend (cuBLAS chunks + top-k, torch sparse ops)",
    "cuda": "dlmscope `cuda` backend (csrc/cuda kernels, cuBLAS chunks)",
}


def render_markdown(result: dict) -> str:
    s, m, res = result["shape"], result["machine"], result["results"]
    r = res["ratios"]
    hw = m.get("gpu_name") or m.get("cpu_model")
    lines = [
        f"### Top-K SAE training step — {result['device']}, B={s['B']}, d={s['d']}, n={s['n']}, k={s['k']}, "
        f"{s['dtype']}{' (quick smoke shape)' if s.get('quick') else ''}",
        "",
        f"{hw}; torch {m['torch']}, triton {m.get('triton')}; {m.get('cpu_count')} CPU cores "
        f"({m.get('torch_threads')} torch threads); load avg {m.get('loadavg_1m')} at start; "
        f"dlmscope {m.get('git_commit')}{'+dirty' if m.get('git_dirty') else ''}; {m['date']}. "
        "Medians of the timed rounds; ratios are against times measured in the same run.",
        "",
        "| variant | median time | × GEMM | speed-up vs dense | vs embedding_bag |",
        "|---|---:|---:|---:|---:|",
    ]
    order = ["gemm", *[v for v in res["step_medians_s"] if v not in BASELINES], "dense", "dense_compiled"]
    for v in order:
        if v not in res["step_medians_s"]:
            continue
        t = res["step_medians_s"][v]
        if v == "torch":
            emb = "1.00×"
        else:
            emb = _fmt_x(r["embedding_bag_over_variant"].get(v)) if v not in BASELINES else "—"
        dense = "1.00×" if v == "dense" else _fmt_x(r["dense_over_variant"].get(v)) if v != "gemm" else "—"
        lines.append(f"| {STEP_LABELS.get(v, v)} | {_fmt_t(t)} | {_fmt_x(r['step_over_gemm'].get(v))} | "
                     f"{dense} | {emb} |")
    busy = result.get("contention")
    if busy:
        lines += ["", f"**Warning:** other processes kept up to {busy['max_foreign_cpu_cores']:.2f} of "
                      f"{m.get('cpu_count')} CPU cores busy during the timed rounds ({', '.join(busy['variants'])}); "
                      "those timings and their ratios are inflated by contention. Re-run on an idle machine. "
                      "Ratios of the fastest rounds (× GEMM): " +
                      ", ".join(f"{v} {x:.2f}×" for v, x in r["step_over_gemm_min"].items() if x is not None) + "."]
    tgt = res.get("cpu_target")
    if tgt:
        if tgt["measured_x_gemm"] is None:
            lines += ["", f"Target: our CPU step ≤ {CPU_TARGET}× GEMM — `cpu` backend not measured "
                          f"(available backends: {m.get('dlmscope_backends')})."]
        else:
            lines += ["", f"Target: our CPU step ≤ {CPU_TARGET}× GEMM — measured "
                          f"**{tgt['measured_x_gemm']:.2f}×**: {'met' if tgt['met'] else 'NOT met'}."]
    if res["op_medians_s"]:
        lines += ["", "| op | implementation | median time | speed-up vs reference | vs torch backend |",
                  "|---|---|---:|---:|---:|"]
        for op, times in res["op_medians_s"].items():
            for v, t in times.items():
                ref = "1.00×" if v == "reference" else _fmt_x(r["ops_reference_over_variant"].get(op, {}).get(v))
                tb = ("1.00×" if v == "torch" else
                      _fmt_x(r["ops_torch_over_variant"].get(op, {}).get(v)) if v not in OP_BASELINES else "—")
                lines.append(f"| {op} | {v} | {_fmt_t(t)} | {ref} | {tb} |")
    if result.get("pytest_exit"):
        bad = {k: v for k, v in result["pytest_exit"].items() if v not in (0, None)}
        if bad:
            lines += ["", f"Incomplete run: pytest exit codes {bad} (see the log); missing rows were skipped "
                          "or failed."]
    return "\n".join(lines) + "\n"


def print_summary(result: dict) -> None:
    res = result["results"]
    r = res["ratios"]
    print()
    print(f"== dlmscope benchmark: {result['device']} {result['tag']}")
    print(f"{'step variant':<16}{'median':>12}{'x GEMM':>9}{'(min/min)':>10}{'dense/this':>12}{'emb_bag/this':>14}")
    for v, t in res["step_medians_s"].items():
        print(f"{v:<16}{_fmt_t(t):>12}{_fmt_x(r['step_over_gemm'].get(v)):>9}"
              f"{_fmt_x(r['step_over_gemm_min'].get(v)):>10}"
              f"{_fmt_x(r['dense_over_variant'].get(v)):>12}{_fmt_x(r['embedding_bag_over_variant'].get(v)):>14}")
    for op, d in res["op_medians_s"].items():
        for v, t in d.items():
            print(f"  {op:<20}{v:<14}{_fmt_t(t):>12}  ref/this "
                  f"{_fmt_x(r['ops_reference_over_variant'].get(op, {}).get(v)) if v != 'reference' else '1.00×'}")
    if result.get("contention"):
        c = result["contention"]
        print(f"WARNING: machine busy during timing (up to {c['max_foreign_cpu_cores']:.2f} foreign cores): "
              f"{', '.join(c['variants'])}")
    tgt = res.get("cpu_target")
    if tgt:
        got = "not measured (no cpu backend)" if tgt["measured_x_gemm"] is None else \
            f"{tgt['measured_x_gemm']:.2f}x -> {'MET' if tgt['met'] else 'NOT MET'}"
        print(f"target: cpu step <= {CPU_TARGET}x GEMM: {got}")
    print("== end of summary")


# ---- main -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--quick", action="store_true", help="smoke-test shape B=256, d=64, n=1024, k=8")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--shape", default=None, help="B,d,n,k")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--backends", default=None, help="comma-separated (default: all available for the device)")
    ap.add_argument("--compile", dest="compile_dense", action="store_true", default=None,
                    help="include dense_compiled (default: on cuda only)")
    ap.add_argument("--no-compile", dest="compile_dense", action="store_false")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--only", choices=("step", "ops"), default=None)
    ap.add_argument("--timeout", default=None,
                    help="seconds per pytest run: one number for both, or STEP,OPS (e.g. 300,150)")
    ap.add_argument("--from-records", default=None, help="skip running: re-render from a .jsonl record file or an earlier results .json")
    args = ap.parse_args(argv)
    timeouts = [float(t) for t in args.timeout.split(",")] if args.timeout else [None]
    args.timeouts = {"step": timeouts[0], "ops": timeouts[-1]}

    import steps  # noqa: E402  (imports torch and dlmscope)

    cfg = steps.BenchConfig.resolve(device=args.device, quick=args.quick or None, shape=args.shape,
                                    dtype=args.dtype, backends=args.backends, compile_dense=args.compile_dense)
    args.dtype_name = steps._DTYPE_TAGS[cfg.dtype]
    out_dir = args.out if os.path.isabs(args.out) else os.path.join(os.getcwd(), args.out)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{cfg.device}-{cfg.tag}")
    info = machine_info(cfg.device)
    codes = None
    t0 = time.time()
    if args.from_records:
        records = load_records(args.from_records)
    else:
        with tempfile.TemporaryDirectory(prefix="dlmscope-bench-") as workdir:
            record_path = os.path.join(workdir, "records.jsonl")
            codes = run_suite(args, cfg, record_path, workdir)
            records = load_records(record_path)
    result = {
        "device": cfg.device,
        "tag": cfg.tag,
        "shape": cfg.shape_dict(),
        "backends": list(cfg.backends),
        "machine": info,
        "pytest_exit": codes,
        "wall_s": round(time.time() - t0, 1),
        "records": sorted(records, key=lambda r: (r["group"] != "step", r["group"], r["variant"])),
        "results": compute(records, cfg.device),
    }
    foreign = {f"{r['group']}/{r['variant']}": r.get("foreign_cpu_cores") for r in records
               if r.get("foreign_cpu_cores") is not None}
    if cfg.device == "cpu" and foreign and max(foreign.values()) > CONTENTION_CORES:
        result["contention"] = {"max_foreign_cpu_cores": max(foreign.values()),
                                "variants": [k for k, v in foreign.items() if v > CONTENTION_CORES]}
    result["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = render_markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print_summary(result)
    print()
    print(md)
    print(f"wrote {stem}.json and {stem}.md")
    if not records:
        return 1
    return 0 if not codes or all(c == 0 for c in codes.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
