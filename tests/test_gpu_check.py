"""``scripts/gpu_check.sh`` dry-run on the CPU (``GPU_CHECK_DRY=1``): every stage runs, leaves its results in
the results directory, and the summary and results reach ``$OUT`` — so the script a GPU machine runs cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_RESULTS=str(tmp_path / "results"), OUT=str(tmp_path / "out"),
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for stage in ("env", "import", "kernels", "correctness", "sweep", "bench"):
        assert any(line.split()[:2] == [stage, "ok"] for line in summary.splitlines()), summary
    corr = json.loads((tmp_path / "out" / "correctness.json").read_text())
    assert corr["checks"] and all(c["passed"] for c in corr["checks"])
    assert {c["check"] for c in corr["checks"]} == {"encode", "decode+backward"}
    assert list((tmp_path / "out").glob("cpu-quick-*.md")) and (tmp_path / "out" / "gpu_check_all.tar.gz").exists()
    assert (tmp_path / "out" / "junit-kernels.xml").exists()
    sweep = json.loads((tmp_path / "out" / "encode_sweep.json").read_text())
    assert [r["variant"] for r in sweep["rows"]][0] == "gemm" and all("error" not in r for r in sweep["rows"])
