"""torchrun with 2 CPU processes (gloo) equals single-process training on the same global batches.

Each rank gets half of every global batch; the last global batch is uneven (19 + 18 rows) and rank 1's stream
has one extra batch, which must end training on both ranks without a hang. AuxK is active (small dead_tokens),
so the merged dead counters and the global AuxK normaliser are exercised too.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.torchrun import run_torchrun

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_gloo_equals_single_process(tmp_path):
    from tests.helpers.train_worker import N_BATCHES, final_tensors, global_stream, make_config, make_log, make_saes
    from dlmscope.train.trainer import Trainer

    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "tests.helpers.train_worker", "--out", str(out), "--steps", "20",
           "--ckpt", str(tmp_path / "ckpt"), "--checkpoint-every", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert f"done step={N_BATCHES}" in proc.stdout  # stopped when rank 0's stream ended
    # rank 0 alone wrote the checkpoints
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"step-{N_BATCHES:09d}"]

    trainer = Trainer(make_saes(), make_config(steps=20), log=make_log())
    expected = final_tensors(trainer.fit(global_stream()))
    assert trainer.step == N_BATCHES
    got = load_file(str(out))
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.distributed
def test_21_6_ddp_fresh_run_and_another_runs_resume_are_refused_on_every_rank(tmp_path):
    """Rank 0 judges the checkpoint folder and every rank stops with it (none left waiting in a collective)."""
    ck = tmp_path / "ckpt"
    worker = "tests.helpers.train_worker"
    first = run_torchrun(2, "--out", str(tmp_path / "a.safetensors"), "--steps", "20", "--ckpt", str(ck),
                         worker=worker)
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.name for p in ck.iterdir())
    fresh = run_torchrun(2, "--out", str(tmp_path / "b.safetensors"), "--steps", "20", "--ckpt", str(ck),
                         worker=worker)
    assert fresh.returncode != 0 and "already holds checkpoints" in fresh.stderr, fresh.stderr[-3000:]
    assert "another rank failed while checking the checkpoint_dir" in fresh.stderr  # rank 1 stopped too
    other = run_torchrun(2, "--out", str(tmp_path / "c.safetensors"), "--steps", "20", "--ckpt", str(ck),
                         "--resume", "--lr", "0.003", worker=worker)
    assert other.returncode != 0 and "config.lr" in other.stderr, other.stderr[-3000:]
    assert sorted(p.name for p in ck.iterdir()) == before
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "c.safetensors").exists()
