"""pytest-benchmark harness for the dlmscope benchmarks.

The suites are the ``bench_*.py`` files here (collected by :func:`pytest_collect_file`: pytest's own pattern is
``test_*.py``), each named by what it times; ``workloads.py`` and ``harvest_train.py`` build dlmscope's side of
each comparison, ``baselines.py`` the plain-PyTorch side, and ``report.py`` is the one driver that runs suites and
writes ``results/``.

Options (each also settable by environment variable; the option wins):

  --bench-device cpu|cuda     DLMSCOPE_BENCH_DEVICE    (default: cuda if available, else cpu)
  --bench-quick               DLMSCOPE_BENCH_QUICK=1   smoke-test shape B=256, d=64, n=1024, k=8
  --bench-shape B,d,n,k       DLMSCOPE_BENCH_SHAPE     (default cpu 4096,512,16384,32; cuda 16384,4096,131072,64)
  --bench-dtype fp32|bf16|…   DLMSCOPE_BENCH_DTYPE     (default cpu fp32, cuda bf16)
  --bench-backends a,b        DLMSCOPE_BENCH_BACKENDS  (default: every available backend for the device,
                                                        triton only on cuda)
  --bench-compile / --bench-no-compile   DLMSCOPE_BENCH_COMPILE=1|0   the dense_compiled variant (default: cuda)
  --bench-warmup N / --bench-rounds N    DLMSCOPE_BENCH_WARMUP / _ROUNDS
  --bench-record PATH         DLMSCOPE_BENCH_RECORD    append one JSON line per finished benchmark (robust to
                                                        a run that is killed half-way; report.py reads it)

Run: ``python -m pytest benchmarks --bench-quick`` (seconds) or ``python benchmarks/report.py``.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

import workloads  # noqa: E402


def pytest_collect_file(file_path, parent):
    """Collect the ``bench_*.py`` suites; a file named on the command line pytest collects itself."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_addoption(parser):
    group = parser.getgroup("dlmscope-bench")
    group.addoption("--bench-device", default=None, choices=("cpu", "cuda"))
    group.addoption("--bench-quick", action="store_true", default=None)
    group.addoption("--bench-shape", default=None, help="B,d,n,k")
    group.addoption("--bench-dtype", default=None)
    group.addoption("--bench-backends", default=None, help="comma-separated dlmscope backends")
    group.addoption("--bench-compile", dest="bench_compile", action="store_true", default=None)
    group.addoption("--bench-no-compile", dest="bench_compile", action="store_false")
    group.addoption("--bench-warmup", type=int, default=None)
    group.addoption("--bench-rounds", type=int, default=None)
    group.addoption("--bench-record", default=None)


def pytest_report_header(config):
    try:
        cfg = workloads.BenchConfig.from_pytest(config)
    except Exception as exc:  # noqa: BLE001
        return [f"dlmscope bench: bad configuration: {exc}"]
    return [f"dlmscope bench: device={cfg.device} shape={cfg.tag} backends={list(cfg.backends)} "
            f"compile_dense={cfg.compile_dense} torch={torch.__version__}"]


def pytest_generate_tests(metafunc):
    cfg = workloads.BenchConfig.from_pytest(metafunc.config)
    if "step_variant" in metafunc.fixturenames:
        metafunc.parametrize("step_variant", workloads.step_variants(cfg))
    if "op_variant" in metafunc.fixturenames:
        pairs = workloads.op_variants(cfg)
        metafunc.parametrize("op_variant", pairs, ids=[f"{op}-{v}" for op, v in pairs])


@pytest.fixture(scope="session")
def bench_config(request) -> workloads.BenchConfig:
    cfg = workloads.BenchConfig.from_pytest(request.config)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but torch sees no CUDA device")
    return cfg


def _cpu_sample() -> tuple[float, float, float] | None:
    """(wall s, busy CPU-seconds of the whole machine, CPU-seconds of this process) — Linux only."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user nice system idle iowait irq softirq steal
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def _foreign_cores(before, after) -> float | None:
    """Average number of cores other processes kept busy between two samples (contention indicator)."""
    if before is None or after is None or after[0] - before[0] < 1.0:  # /proc/stat ticks: 10 ms, too coarse below
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def _is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(exc, oom_types) or "out of memory" in str(exc).lower()


class Runner:
    """Builds a workload, warms it up, times it with ``benchmark.pedantic``, records the result."""

    def __init__(self, request, benchmark, cfg: workloads.BenchConfig):
        self.request, self.benchmark, self.cfg = request, benchmark, cfg
        self.record_path = request.config.getoption("--bench-record") or os.environ.get("DLMSCOPE_BENCH_RECORD")

    def _sync(self):
        if self.cfg.device == "cuda":
            torch.cuda.synchronize()

    def run(self, group: str, variant: str, build, extra: dict | None = None):
        cfg, benchmark = self.cfg, self.benchmark
        warmup, rounds = cfg.rounds_for(group)
        if variant == "dense_compiled":
            warmup = max(warmup, 3)  # compile, then the optimizer-state recompile, then a steady call
        benchmark.group = f"{group} {cfg.device} {cfg.tag}"
        benchmark.extra_info.update({"group": group, "variant": variant, **cfg.shape_dict(), **(extra or {})})
        workload = None
        oom = None
        try:
            t0 = time.perf_counter()
            try:
                workload = build()
                benchmark.extra_info.update(workload.info)
                for _ in range(max(1, warmup)):  # at least one call outside the timer: compile/autotune/OOM
                    workload()
                self._sync()
            except Exception as exc:  # noqa: BLE001
                if not _is_oom(exc):
                    raise
                oom = str(exc).splitlines()[0][:200]  # keep no traceback: it would pin the tensors
            if oom is not None:
                if workload is not None:
                    workload.release()
                    workload = None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                pytest.skip(f"{group}/{variant}: out of memory at {cfg.tag} on {cfg.device}: {oom}")
            benchmark.extra_info["warmup_s"] = round(time.perf_counter() - t0, 3)
            sync = self._sync
            if cfg.device == "cuda":
                def target():
                    workload()
                    torch.cuda.synchronize()
            else:
                target = workload
            before = _cpu_sample()
            benchmark.pedantic(target, setup=sync, rounds=rounds, warmup_rounds=0, iterations=1)
            foreign = _foreign_cores(before, _cpu_sample())
            if foreign is not None:
                benchmark.extra_info["foreign_cpu_cores"] = round(foreign, 2)
            self._record(group, variant, benchmark)
        finally:
            if workload is not None:
                workload.release()

    def _record(self, group, variant, benchmark):
        if not self.record_path or benchmark.disabled or benchmark.stats is None:
            return
        s = benchmark.stats.stats
        row = {"group": group, "variant": variant, "median": s.median, "mean": s.mean, "min": s.min,
               "max": s.max, "stddev": s.stddev if s.rounds > 1 else 0.0, "rounds": s.rounds,
               "test": self.request.node.nodeid, **benchmark.extra_info}
        os.makedirs(os.path.dirname(os.path.abspath(self.record_path)), exist_ok=True)
        with open(self.record_path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture
def bench_runner(request, benchmark, bench_config) -> Runner:
    return Runner(request, benchmark, bench_config)
