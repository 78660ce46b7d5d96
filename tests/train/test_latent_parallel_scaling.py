"""docs/scaling.md is exactly what docs/scaling_table.py writes, and the script's counts are the right ones."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("scaling_table", ROOT / "docs" / "scaling_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_doc_is_generated_and_current(table):
    assert table.main(["--check"]) == 0, "docs/scaling.md drifted: run python docs/scaling_table.py"


def test_counts_follow_the_implementation(table):
    p = table.plan("16M", 64, 64)  # 1 x 64: 262,144 latents per rank, all 16,384 rows
    n_r, d, B = (1 << 24) // 64, 4096, 16384
    assert p.mem["weights"] == pytest.approx((2 * n_r * d + n_r + d) * 4 / 1e9)
    assert p.mem["adam"] == pytest.approx(2 * p.mem["weights"])
    # one all-gather of (value bits, int32 id) pairs of width k (+ k_aux), as latent_parallel._merge packs them
    assert p.comm["gather top-k"] == 63 * B * 64 * 8
    assert p.comm["gather AuxK"] == 63 * B * 2048 * 8
    assert p.comm["all-reduce x_hat"] == pytest.approx(2 * 63 / 64 * B * d * 4)
    assert "all-reduce grads" not in p.comm  # no data group
    assert p.gemm_s == pytest.approx(2 * B * d * n_r / 650e12)
    dp = table.plan("1M", 8, 1)  # plain data parallelism: no latent collectives, gradients all-reduced
    assert set(dp.comm) == {"all-reduce grads", "all-reduce fired"}
    assert dp.comm["all-reduce grads"] == pytest.approx(2 * 7 / 8 * dp.mem["weights"] * 1e9)
