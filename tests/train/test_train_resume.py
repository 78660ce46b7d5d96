"""Kill a training subprocess (SIGKILL) after a mid-run checkpoint, resume it in a new one, and compare.

The resumed run reproduces the uninterrupted run bitwise (torch.equal): everything that determines the next
step — SAE tensors, Adam and decoder moments, Adam step counts, dead counters, schedule step, norm factor,
stream position — is restored exactly, and the kernels are deterministic for a fixed thread count (all three
processes run with one thread).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dlmscope.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def _worker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.train_worker", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"worker {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_killed_run_resumes_to_identical_weights(tmp_path):
    full, resumed, ckdir = tmp_path / "full.safetensors", tmp_path / "resumed.safetensors", tmp_path / "ckpt"
    _worker("--out", str(full))

    killed = _worker("--out", str(tmp_path / "never.safetensors"), "--ckpt", str(ckdir), "--checkpoint-every", "5",
                     "--kill-at", "12", check=False)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    assert not (tmp_path / "never.safetensors").exists()
    latest = ckpt.latest_checkpoint(ckdir)
    assert latest is not None and latest.name == "step-000000010", sorted(p.name for p in ckdir.iterdir())
    assert [p.name for p in ckdir.iterdir()] == [latest.name]  # only the last one kept, no temp dirs

    out = _worker("--out", str(resumed), "--ckpt", str(ckdir), "--resume")
    assert "done step=13" in out.stdout
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())
