"""Latent-parallel step time and peak memory per rank vs R, all R in one run (ratios from the same run).

    python benchmarks/report.py latent                      # CPU, gloo: R = 1, 2, 4 at a small shape
    python benchmarks/report.py latent --device cuda --latent 1 2 4 8 --d 4096 --n 1048576 --k 64 \\
        --batch 16384 --out benchmarks/results/gpu-latent-parallel.md                   # one GPU per rank, nccl

(``python benchmarks/latent_parallel_scaling.py ...`` is the same.)

For each R the launcher starts ``torchrun --nproc-per-node R`` on this script in worker mode (pure latent
parallelism, a 1 x R grid): every rank initialises only its shard (``LatentShard.init``), trains ``--steps``
steps of the :class:`~dlmscope.train.latent_trainer.LatentParallelTrainer` on the same pre-generated batches, and
reports its step times (after ``--warmup`` steps) and peak memory: ``torch.cuda.max_memory_allocated`` on CUDA,
peak RSS on the CPU (which includes the ~0.3 GB of the Python and torch runtime). The table gives the median step
time and the peak memory of the slowest / largest rank, each also relative to R = 1. On a 2-core CPU the ranks of
R > 2 share cores (one thread each), so there the step time measures oversubscription, not scaling; the memory
column is what the CPU run shows.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlmscope.util import distributed as D  # noqa: E402
from dlmscope.train.latent_parallel import LatentShard, make_grid  # noqa: E402
from dlmscope.train.latent_trainer import LatentParallelTrainer  # noqa: E402
from dlmscope.train.trainer import LogConfig, TrainConfig  # noqa: E402


_ARGS_ENV = "DLMSCOPE_BENCH_ARGS"


def _timed(batches, stamps):
    """Yield the batches, stamping the time of each pull (a step is the gap between two pulls)."""
    for x in batches:
        stamps.append(time.perf_counter())
        yield x
    stamps.append(time.perf_counter())


def worker(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    grid = make_grid(args.latent_size, device)
    lo, hi = grid.bounds(args.n)
    shard = LatentShard.init(args.d, args.n, args.k, lo, hi, seed=0, device=device)
    cfg = TrainConfig(steps=args.steps, warmup_steps=1, normalize_activations=False, init_b_dec=False,
                      backend=args.backend)
    trainer = LatentParallelTrainer([shard], grid, cfg, log=LogConfig(log_every=0, progress=False))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch, args.d, generator=g).to(device) for _ in range(args.steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps: list[float] = []
    trainer.fit(_timed(batches, stamps))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])][args.warmup:]
    state = sum(t.numel() * t.element_size() for t in (shard.W_enc, shard.b_enc, shard.W_dec, shard.b_dec)) * 4
    mine = torch.tensor([statistics.median(steps), float(peak), float(state)], dtype=torch.float64, device=device)
    every = D.all_gather_stacked(mine)
    if D.is_main():
        Path(args.json).write_text(json.dumps({"step_s": every[:, 0].max().item(), "peak_bytes": every[:, 1].max().item(),
                                               "state_bytes": every[:, 2].max().item(),
                                               "backend": trainer.groups[0].backend or "auto"}))
    D.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> None:
    results = {}
    env = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning", "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        for R in args.latent:
            out = Path(tmp) / f"r{R}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(R), "--nnodes", "1",
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(Path(__file__).resolve()),
                   "--worker"]
            # the shape travels by environment: torchrun's own parser would take --d, --n... for its options
            env[_ARGS_ENV] = json.dumps({**vars(args), "latent_size": R, "json": str(out)})
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                raise SystemExit(f"R={R} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
            results[R] = json.loads(out.read_text())
            print(f"R={R}: {results[R]}", flush=True)
    write_table(args, results)


def write_table(args, results: dict) -> None:
    base = results[min(results)]
    rows = [f"| {R} | {r['step_s'] * 1e3:.1f} | {r['step_s'] / base['step_s']:.2f} | {r['peak_bytes'] / 2**20:.0f} | "
            f"{r['peak_bytes'] / base['peak_bytes']:.2f} | {r['state_bytes'] / 2**20:.1f} |"
            for R, r in sorted(results.items())]
    where = "peak RSS (MiB, incl. the runtime)" if args.device == "cpu" else "max_memory_allocated (MiB)"
    text = f"""# Latent-parallel step time and memory per rank vs R ({args.device})

`{' '.join(['python benchmarks/report.py latent', *args.cmdline])}`. One SAE d={args.d}, n={args.n}, k={args.k},
{args.batch} rows per step, {args.steps} steps ({args.warmup} warmup), 1 x R grid, {args.threads} thread(s) per rank,
backend {base['backend']}; torch {torch.__version__}. Slowest rank's median step, largest rank's peak memory; ratios
against R = {min(results)} from this same run. State = fp32 weights + Adam moments + gradients of one rank's shard.

| R | step ms | step vs R=1 | {where} | peak vs R=1 | state MiB |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    if args.device == "cpu":
        text += f"""
On this {os.cpu_count()}-core machine the ranks of R > {os.cpu_count()} share cores, so their step time measures
oversubscription; the per-rank state shrinks as 1/R while the runtime's fixed share of RSS does not.
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latent", type=int, nargs="+", default=[1, 2, 4], help="the R values to run")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-latent-parallel.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cmdline = list(sys.argv[1:] if argv is None else argv)  # the table says how it was made
    if args.worker:
        worker(argparse.Namespace(**json.loads(os.environ[_ARGS_ENV])))
    else:
        launch(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
