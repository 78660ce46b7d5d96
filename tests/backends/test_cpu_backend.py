"""The C++ ``cpu`` backend's own guarantees beyond matching the reference (tests/test_ops.py): ids out of range raise
in the kernels themselves, whether or not the Python value checks run."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dlmscope

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif("cpu" not in dlmscope.available_backends(), reason="the C++ extension is not built")

#: Runs every sparse path of the cpu backend with one bad id and prints one line per case. Out-of-range ids were
#: read as rows before the kernels checked them (garbage or a crash), hence a child process.
_BAD_IDS_SCRIPT = textwrap.dedent("""
    import torch
    import dlmscope
    from dlmscope.backends import get_backend

    dlmscope.set_value_checks(False)
    cpu = get_backend("cpu")
    torch.manual_seed(0)
    n, d, B, k = 10, 6, 3, 4

    def cases(bad):
        ids = torch.tensor([[0, 1, 2, bad]] * B)
        W, b = torch.randn(n, d, requires_grad=True), torch.zeros(d, requires_grad=True)
        v = torch.rand(B, k, requires_grad=True)
        g = torch.randn(B, d)
        yield "forward", lambda: dlmscope.sparse_decode(v, ids, W, b, backend="cpu")
        yield "backward", lambda: torch.ops.dlmscope.sparse_decode_backward(g, v.detach(), ids, W.detach(), "cpu")
        yield "gather_accumulate", lambda: cpu.gather_accumulate(v.detach(), ids, W.detach())
        yield "sddmm", lambda: cpu.sddmm(g, ids, W.detach())
        yield "transpose_reduce", lambda: cpu.transpose_reduce(v.detach(), ids, g, n)

    for bad in (10, -1, 2**40, -2**62):
        for name, call in cases(bad):
            try:
                call()
                print(f"{bad} {name}: no error")
            except RuntimeError as exc:
                ok = f"index {bad} is out of range" in str(exc) and "[0, 10)" in str(exc)
                print(f"{bad} {name}: {'raised' if ok else 'other error: ' + str(exc)[:200]}")
""")


def test_21_4_cpu_sparse_decode_index_out_of_range_raises():
    """With value checks off, an id >= n or < 0 raises RuntimeError naming it, forward and backward, and every
    primitive that takes ids; the process survives."""
    env = {**os.environ, "DLMSCOPE_VALUE_CHECKS": "0", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", _BAD_IDS_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"child exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-2000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 20, proc.stdout
    wrong = [line for line in lines if not line.endswith(": raised")]
    assert not wrong, "\n".join(wrong)
