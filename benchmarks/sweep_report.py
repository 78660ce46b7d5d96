"""Run the k-sweep training-throughput benchmark once and write ratios (JSON + markdown) to benchmarks/results/.

    python benchmarks/sweep_report.py [--quick]

Targets: grouped sweep ≥ 3× the plain-PyTorch dense sweep, and ≥ 1.5× six separate SAEs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    env = dict(os.environ, DLMSCOPE_BENCH_QUICK="1" if args.quick else "0")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "sweep.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "benchmarks" /
               "test_bench_sweep.py"), f"--benchmark-json={raw}", "--benchmark-columns=median,min,max"]
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
    names = {"grouped": "dlmscope Trainer, grouped encoders", "separate": "dlmscope Trainer, six separate "
             "encoder calls", "dense": "plain PyTorch dense Top-K (paper's way)"}
    for key in ("grouped", "separate", "dense"):
        r = rows[key]
        lines.append(f"| {names[key]} | {r['median_s']:.2f} s | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / rows['dense']['tokens_per_s']:.2f}× |")
    lines += ["", f"Grouped vs dense: **{ratios['grouped_vs_dense']:.2f}×** (target ≥ 3×); grouped vs separate: "
              f"**{ratios['grouped_vs_separate']:.2f}×** (target ≥ 1.5×). {shape['steps']} steps per round."]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
