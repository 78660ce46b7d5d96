"""dlmscope.backends.autotune: the fastest candidate is chosen once, cached on disk and reused; failing candidates are
skipped; nothing is timed while disabled."""
from __future__ import annotations

import json

import pytest
import torch

from dlmscope.backends import autotune


@pytest.fixture(autouse=True)
def fresh_table(tmp_path, monkeypatch):
    monkeypatch.setenv("DLMSCOPE_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(autotune, "_TABLE", None)


def test_the_fastest_is_chosen_cached_and_reused(tmp_path):
    timed = []
    speed = {"fused": 3.0, "chunked": 1.0, "torch": 2.0}

    def timer(fn):
        name = fn()
        timed.append(name)
        return speed[name]

    candidates = {name: (lambda name=name: name) for name in speed}
    assert autotune.choose("encode|x", candidates, timer=timer) == "chunked"
    assert sorted(timed) == ["chunked", "fused", "torch"]
    assert json.loads((tmp_path / "autotune.json").read_text()) == {"encode|x": "chunked"}
    assert autotune.choose("encode|x", candidates, timer=timer) == "chunked" and len(timed) == 3   # not re-timed
    autotune._TABLE = None                                                  # a new process reads the file
    assert autotune.choose("encode|x", candidates, timer=lambda fn: 1 / 0) == "chunked"


def test_failing_candidates_are_skipped():
    def timer(fn):
        return fn()

    def oom():
        raise RuntimeError("CUDA out of memory")

    assert autotune.choose("k1", {"fused": lambda: 2.0, "torch": oom}, timer=timer) == "fused"
    assert autotune.choose("k2", {"fused": oom, "torch": oom}, timer=timer) == "fused"   # all fail: the first
    assert "k2" not in autotune._table()


def test_enabled_and_shape_key(monkeypatch):
    monkeypatch.setenv("DLMSCOPE_AUTOTUNE", "0")
    assert not autotune.enabled()
    monkeypatch.setenv("DLMSCOPE_AUTOTUNE", "1")
    assert autotune.enabled()
    x = torch.zeros(300, 64, dtype=torch.bfloat16)
    assert autotune.shape_key("encode", x, 4096, 32) == "encode|cpu|bfloat16|B512|d64|n4096|k32"
