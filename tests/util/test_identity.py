"""dlmscope.util.identity: the leaves where two JSON identities differ, by path."""
from __future__ import annotations

from dlmscope.util.identity import MISSING, differences


def test_differences_name_each_differing_leaf_by_its_path():
    ours = {"config": {"lr": 3e-4, "k": [4, 8]}, "saes": [{"n": 64}, {"n": 32}], "text": None}
    theirs = {"config": {"lr": 1e-3, "k": [4, 8]}, "saes": [{"n": 64}, {"n": 16}], "extra": 1, "text": None}
    assert differences(ours, theirs) == [("config.lr", 3e-4, 1e-3), ("extra", MISSING, 1), ("saes[1].n", 32, 16)]
    assert differences(ours, theirs, only_shared=True) == [("config.lr", 3e-4, 1e-3), ("saes[1].n", 32, 16)]
    assert differences(ours, ours) == []
