#!/usr/bin/env python
"""The benchmark driver: runs a suite once and writes its ratios to ``benchmarks/results/`` (JSON + markdown).

    python benchmarks/report.py [step] [--device cpu|cuda] [--quick] ...   training step + ops (the default)
    python benchmarks/report.py sweep [--quick]                            k-sweep training throughput
    python benchmarks/report.py pipeline [--tokens N] [--quick]            harvest + train on the embedded DLM
    python benchmarks/report.py latent [--device cuda --latent 1 2 4 8 ...]  latent-parallel step time / memory vs R
    python benchmarks/report.py COMMAND --help

``step``: runs ``pytest benchmarks/bench_train_step.py`` then ``benchmarks/bench_ops.py`` (each a separate pytest
process with ``--benchmark-json`` and its own timeout; every finished benchmark is also appended to a JSON-lines
record, so a run killed half-way still reports what it measured), then prints and writes

  <out>/<device>-<shape-tag>.json   raw medians (+ min/mean/stddev/rounds), ratios, machine info
  <out>/<device>-<shape-tag>.md     markdown tables (docs/benchmarks.md quotes them)

Ratios: each step variant / GEMM (same run), dense / each of ours (speed-up), embedding_bag (the ``torch``
backend) / each other backend, and each op: reference / backend.

``sweep``: ``pytest benchmarks/bench_sweep_training.py`` once; ratios grouped vs dense and vs separate
(``cpu-sweep-*.json`` / ``.md``). ``pipeline``: the pipelines of ``harvest_train.py`` / ``baselines.run_plain``
once each at full size, without pytest (``cpu-pipeline-world-dlm.*``). ``latent``: ``latent_parallel_scaling.py``
(torchrun per R; ``cpu-latent-parallel.md``).

Layout of ``benchmarks/``: the ``bench_*.py`` suites (pytest-benchmark, each named by what it times), the
plain-PyTorch baselines in ``baselines.py``, dlmscope's workloads in ``workloads.py`` / ``harvest_train.py``, the
GPU-check stages ``gpu_correctness.py`` and ``encode_sweep.py``, and the tools ``cpu_kernels.py`` (the C++
kernels' primitives) and ``sm90_encoder_compile.py`` (registers / spills of the Triton kernels for sm_90).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)  # the repo's dlmscope, also when it is not installed

CPU_TARGET = 1.8  # our CPU step <= 1.8x the bare encoder GEMM (docs/design.md)
CONTENTION_CORES = 0.25  # other processes using more than this many cores while we time: flag the run
BASELINES = ("gemm", "dense", "dense_compiled")
OP_BASELINES = ("reference", "adam_foreach")
OPS = ("encode", "decode_fwd_bwd", "decoder_norm_step")


# ---- machine info -------------------------------------------------------------------------------------


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


# ---- step: running the suites -------------------------------------------------------------------------


def run_suite(args, cfg, record_path: str, workdir: str) -> dict:
    """Run the selected benchmark files, one pytest process each; return their exit codes."""
    files = {"step": "bench_train_step.py", "ops": "bench_ops.py"}
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


# ---- step: ratios -------------------------------------------------------------------------------------


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


# ---- step: rendering ----------------------------------------------------------------------------------


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
    "batchtopk": "dlmscope BatchTopK SAE (batch-level top-k on the fused encoder)",
    "jumprelu": "dlmscope JumpReLU SAE (threshold rule, straight-through L0), L0 ≈ k",
    "matryoshka": "dlmscope Matryoshka SAE (BatchTopK, n/8 n/4 n/2 n prefixes from one decode)",
}


def render_step(result: dict) -> str:
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


# ---- step: the command --------------------------------------------------------------------------------


def step(argv) -> int:
    ap = argparse.ArgumentParser(prog="report.py step", description="The training step and op-level suites "
                                 "(bench_train_step.py, bench_ops.py) once; ratios against the GEMM, dense, reference.")
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

    import workloads  # noqa: E402  (imports torch and dlmscope)

    cfg = workloads.BenchConfig.resolve(device=args.device, quick=args.quick or None, shape=args.shape,
                                    dtype=args.dtype, backends=args.backends, compile_dense=args.compile_dense)
    args.dtype_name = workloads._DTYPE_TAGS[cfg.dtype]
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
    md = render_step(result)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print_summary(result)
    print()
    print(md)
    print(f"wrote {stem}.json and {stem}.md")
    if not records:
        return 1
    return 0 if not codes or all(c == 0 for c in codes.values()) else 2


# ---- sweep: k-sweep training throughput ---------------------------------------------------------------


SWEEP_LABELS = {"grouped": "dlmscope Trainer, grouped encoders",
                "separate": "dlmscope Trainer, six separate encoder calls",
                "dense": "plain PyTorch dense Top-K (paper's way)"}


def sweep(argv) -> int:
    """Run the k-sweep training-throughput benchmark once and write ratios (JSON + markdown).

    Targets: grouped sweep ≥ 3× the plain-PyTorch dense sweep, and ≥ 1.5× six separate SAEs."""
    parser = argparse.ArgumentParser(prog="report.py sweep", description=sweep.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    env = dict(os.environ, DLMSCOPE_BENCH_QUICK="1" if args.quick else "0")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "sweep.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               os.path.join(ROOT, "benchmarks", "bench_sweep_training.py"), f"--benchmark-json={raw}",
               "--benchmark-columns=median,min,max"]
        rc = subprocess.call(cmd, env=env, cwd=ROOT)
        if rc != 0 or not raw.exists():
            print(f"benchmark run failed (exit {rc})", file=sys.stderr)
            return rc or 1
        data = json.loads(raw.read_text())
    rows = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        median = bench["stats"]["median"]
        rows[info["variant"]] = dict(median_s=median, tokens_per_s=info["tokens_per_round"] / median)
    shape = {k: data["benchmarks"][0]["extra_info"][k] for k in ("d", "n", "B", "ks", "steps")}
    ratios = {
        "grouped_vs_dense": rows["grouped"]["tokens_per_s"] / rows["dense"]["tokens_per_s"],
        "grouped_vs_separate": rows["grouped"]["tokens_per_s"] / rows["separate"]["tokens_per_s"],
        "separate_vs_dense": rows["separate"]["tokens_per_s"] / rows["dense"]["tokens_per_s"],
    }
    import torch

    machine = dict(cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                   threads=torch.get_num_threads(), cores=os.cpu_count())
    tag = "cpu-sweep-quick" if args.quick else f"cpu-sweep-d{shape['d']}-n{shape['n']}-B{shape['B']}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(dict(shape=shape, variants=rows, ratios=ratios, machine=machine),
                                                indent=2))
    lines = [f"#### k-sweep training throughput — six SAEs, d={shape['d']}, n={shape['n']}, B={shape['B']}, "
             f"ks={shape['ks']}, fp32, CPU ({machine['threads']} threads)", "",
             "| variant | median time / round | tokens/s | vs dense |", "|---|---:|---:|---:|"]
    for key in ("grouped", "separate", "dense"):
        r = rows[key]
        lines.append(f"| {SWEEP_LABELS[key]} | {r['median_s']:.2f} s | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / rows['dense']['tokens_per_s']:.2f}× |")
    lines += ["", f"Grouped vs dense: **{ratios['grouped_vs_dense']:.2f}×** (target ≥ 3×); grouped vs separate: "
              f"**{ratios['grouped_vs_separate']:.2f}×** (target ≥ 1.5×). {shape['steps']} steps per round."]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


# ---- pipeline: harvest + train on the embedded DLM ----------------------------------------------------

PIPELINE_LABELS = {
    "dlmscope": "dlmscope: ActivationStream (one truncated forward, disk cache) → Trainer (fused ops, grouped)",
    "plain": "plain PyTorch, paper's way: full forward + hook, model re-run per layer, dense Top-K",
    "plain_one_forward": "plain PyTorch, one full forward + hooks on all layers, dense Top-K",
}


def _foreign(rows: dict) -> str:
    vals = [r["foreign_cpu_cores"] for r in rows.values() if r.get("foreign_cpu_cores") is not None]
    return f"≤ {max(vals):.2f}" if vals else "?"


def _truncation_note(s: dict) -> str:
    deepest, n = max(s["layers"]), s.get("num_layers", 4)
    saved = "only the final norm + LM head" if deepest == n - 1 else \
        f"blocks {deepest + 1}–{n - 1}, the final norm and the LM head"
    return (f"The deepest hooked layer is {deepest} of blocks 0–{n - 1}, so truncation saves {saved}; the rest of "
            f"dlmscope's gain comes from one forward for all layers (activation cache; layer {deepest}'s phase "
            "reads it back) and the fused SAE training.")


def render_pipeline(result: dict) -> str:
    s, m, rows = result["settings"], result["machine"], result["variants"]
    base = rows.get("plain")
    lines = [
        f"#### Harvest + train, embedded DLM (LLaDA format, {s.get('num_layers', 4)} blocks, d={s.get('d_model', 128)})"
        f" — layers {s['layers']}, mask policy, "
        f"n={s['n']}, k={s['ks']}, B={s['batch_size']}, {s['tokens']:,} kept tokens per layer, fp32, CPU", "",
        f"{m['cpu_model']}; torch {m['torch']}; {m['cpu_count']} CPU cores ({m['torch_threads']} torch threads); "
        f"`uptime` at start: {m.get('uptime')}; other processes kept {_foreign(rows)} cores busy on average "
        "while timing; "
        f"dlmscope {m['git_commit']}{'+dirty' if m['git_dirty'] else ''}; {m['date']}. One run per variant "
        "(after an untimed 2-batch warm-up); tokens/s = kept tokens per layer × layers / wall seconds.", "",
        "| pipeline | wall | tokens/s | vs plain (paper's way) | held-out FVE k=" + "/".join(map(str, s["ks"])) +
        " (layer " + ", layer ".join(map(str, s["layers"])) + ") |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        fves = "; ".join("/".join(f"{r['heldout'][str(L)][str(k)]['fve']:.3f}" for k in s["ks"])
                         for L in s["layers"])
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base else "—"
        lines.append(f"| {PIPELINE_LABELS[name]} | {r['wall_s']:.1f} s | {r['tokens_per_s']:,.0f} | {vs} | {fves} |")
    lines.append("")
    ratios = result["ratios"]
    parts = []
    if "dlmscope_vs_plain" in ratios:
        parts.append(f"dlmscope vs the paper's plain pipeline: **{ratios['dlmscope_vs_plain']:.2f}×**")
    if "dlmscope_vs_plain_one_forward" in ratios:
        parts.append(f"vs plain with one shared forward: **{ratios['dlmscope_vs_plain_one_forward']:.2f}×**")
    if parts:
        lines.append("; ".join(parts) + f". Largest held-out FVE gap between dlmscope and a plain variant: "
                     f"{result['max_fve_gap']:.4f}.")
        lines.append("")
    lines += [
        "Baseline choice: `plain` is what the paper's code does — it trains one layer per run, so each layer's run "
        "re-runs the full model (all blocks + LM head) with a forward hook on that block; `plain_one_forward` is "
        "the stronger plain baseline (one full forward with hooks on both layers feeds both sweeps). Both plain "
        "variants use the same masking (same seed, same kept positions), the same shuffle buffer (`dlmscope.data.shuffle.shuffle_batches`, plain torch), and per SAE "
        "`reference.topk_encode` (dense B×n pre-activations + `torch.topk`) + `reference.sparse_decode` (scatter "
        "into B×n + matmul), MSE, autograd, W_dec-gradient projection, grad clip, `torch.optim.Adam` + LambdaLR, "
        "decoder renorm. Same init, norm factor, geometric-median `b_dec`, lr schedule and step count as dlmscope's "
        "Trainer. Held-out FVE: `evaluate_sae` on the same held-out masked-position activations for every variant. "
        + _truncation_note(s) +
        " Wall time includes writing/reading the cache (tmp dir on local disk).",
        "",
        "Per-phase wall seconds: " + "; ".join(
            f"{name} " + ", ".join(f"layer {L}: {t:.1f} s" for L, t in r["per_layer_s"].items())
            for name, r in rows.items()) + ". Run: `python benchmarks/report.py pipeline`.",
    ]
    return "\n".join(lines) + "\n"


def pipeline(argv) -> int:
    """End-to-end harvest + train throughput on the embedded DLM: dlmscope vs a plain-PyTorch pipeline, one run.

    The job and the variants: ``harvest_train.py`` (dlmscope) and ``baselines.run_plain`` (plain). tokens/s = kept
    training tokens per layer × layers / wall seconds, timed from the first forward to the trained SAEs (model
    loading, tokenization and the held-out evaluation are outside the timer; every variant first does an untimed
    warm-up run on 2 batches). Writes ``<out>/cpu-pipeline-world-dlm.json`` and ``.md`` (``--quick``:
    ``cpu-pipeline-world-dlm-quick.*``)."""
    parser = argparse.ArgumentParser(prog="report.py pipeline", description=pipeline.__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="kept training tokens per layer")
    parser.add_argument("--quick", action="store_true", help="8 batches per layer (seconds)")
    parser.add_argument("--variants", default=",".join(PIPELINE_LABELS))
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in PIPELINE_LABELS]
    if bad:
        parser.error(f"unknown variants {bad}; choose from {list(PIPELINE_LABELS)}")

    import harvest_train as H  # noqa: E402  (imports torch, dlmscope and the model stack)
    from conftest import _cpu_sample, _foreign_cores
    from dlmscope.util import atomic

    s = H.Settings()
    if args.quick:
        s = dataclasses.replace(s, tokens=8 * s.batch_size, sentences=20_000, eval_tokens=4096)
    if args.tokens is not None:
        s = dataclasses.replace(s, tokens=args.tokens)
    s.check()

    machine = machine_info("cpu")
    try:
        machine["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        machine["uptime"] = None
    adapter = H.load_adapter()
    batches = H.token_batches(adapter, s)
    held = H.heldout_activations(adapter, s)
    print(f"{len(batches)} LM batches of {s.lm_batch}×{s.seq_len} tokens available; {s.tokens} kept tokens per "
          f"layer, layers {list(s.layers)}, ks {list(s.ks)}, n={s.n}, B={s.batch_size}; "
          f"{held[s.layers[0]].shape[0]} held-out tokens per layer", flush=True)
    warm = dataclasses.replace(s, tokens=2 * s.batch_size, norm_batches=1)
    for name in variants:
        H.run_variant(name, adapter, batches, warm)

    rows = {}
    for name in variants:
        before = _cpu_sample()
        wall, info, saes = H.run_variant(name, adapter, batches, s)
        foreign = _foreign_cores(before, _cpu_sample())
        rows[name] = {"wall_s": round(wall, 3), "tokens_per_s": s.tokens * len(s.layers) / wall,
                      "per_layer_s": {str(k): round(v, 3) for k, v in info["per_layer_s"].items()},
                      "foreign_cpu_cores": round(foreign, 2) if foreign is not None else None,
                      "heldout": H.heldout_metrics(saes, held)}
        fv = "; ".join(f"L{L}: " + " ".join(f"k{k}={v['fve']:.4f}" for k, v in d.items())
                       for L, d in rows[name]["heldout"].items())
        print(f"{name}: {wall:.1f} s, {rows[name]['tokens_per_s']:,.0f} tokens/s; held-out FVE {fv}", flush=True)
    machine["loadavg_1m_end"] = round(os.getloadavg()[0], 2)

    ratios = {}
    if "dlmscope" in rows:
        for other in ("plain", "plain_one_forward"):
            if other in rows:
                ratios[f"dlmscope_vs_{other}"] = rows["dlmscope"]["tokens_per_s"] / rows[other]["tokens_per_s"]
    gaps = [abs(rows["dlmscope"]["heldout"][L][k]["fve"] - rows[o]["heldout"][L][k]["fve"])
            for o in rows if o != "dlmscope" and "dlmscope" in rows
            for L in rows[o]["heldout"] for k in rows[o]["heldout"][L]]
    settings = dataclasses.asdict(s)
    settings.update(steps=s.steps, model=os.path.relpath(H.MODEL_DIR, ROOT), policy="mask", hook="resid_post",
                    dtype="float32", device="cpu", num_layers=adapter.num_layers, d_model=adapter.d_model)
    result = {"settings": settings, "variants": rows, "ratios": ratios,
              "max_fve_gap": max(gaps) if gaps else None, "machine": machine}
    tag = "cpu-pipeline-world-dlm" + ("-quick" if args.quick else "")
    os.makedirs(args.out, exist_ok=True)
    atomic.write_json(os.path.join(args.out, f"{tag}.json"), result)
    md = render_pipeline(result)
    atomic.write_text(os.path.join(args.out, f"{tag}.md"), md)
    print(md)
    return 0


# ---- latent: latent-parallel step time and memory per rank vs R ---------------------------------------


def latent(argv) -> int:
    """``latent_parallel_scaling.py``: torchrun per R, writes ``results/cpu-latent-parallel.md`` (or ``--out``)."""
    import latent_parallel_scaling  # noqa: E402  (imports torch and dlmscope)

    return latent_parallel_scaling.main(argv, prog="report.py latent")


# ---- main ---------------------------------------------------------------------------------------------

COMMANDS = {"step": step, "sweep": sweep, "pipeline": pipeline, "latent": latent}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    # no command: step (what `make bench` runs)
    command = argv.pop(0) if argv[:1] and argv[0] in COMMANDS else "step"
    return COMMANDS[command](argv)


if __name__ == "__main__":
    sys.exit(main())
