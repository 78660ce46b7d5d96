"""Latent-parallel and 2-D (data x latent) training under torchrun with gloo on CPU equals one process.

Every case trains the SAEs of :mod:`tests.helpers.latent_worker` (uneven shards, k above a shard's size, AuxK on)
and compares the gathered SAEs with the single-process :class:`~dlmscope.train.trainer.Trainer` on the same global
batches, to 1e-6 in fp32. The 2 x 2 grid also has one rank whose stream ends three batches early: every rank
must stop there (a hang fails through the launch timeout). A run killed (SIGKILL) after its step-10 checkpoint
resumes bitwise to the uninterrupted run, and its sharded checkpoint loads into one process and exports.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlmscope import cli
from dlmscope.train import sharded_checkpoint as sc
from dlmscope.sae.topk import TopKSAE
from dlmscope.train.trainer import Trainer
from tests.helpers.latent_worker import data_stream, make_config, make_log, make_saes
from tests.helpers.train_worker import N_BATCHES, final_tensors
from tests.helpers.tiny_models import build_tiny_llada
from tests.helpers.torchrun import run_torchrun

pytestmark = pytest.mark.distributed


def _reference(n_batches: int = N_BATCHES, saes: int = 3, **config) -> dict[str, torch.Tensor]:
    trainer = Trainer(make_saes(saes), make_config(**config), log=make_log())
    return final_tensors(trainer.fit(data_stream(0, 1, n_batches)))


def _assert_close(got: dict, expected: dict, atol: float = 1e-6) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=atol, rtol=0, msg=name)


def _check_run(proc: subprocess.CompletedProcess, out: Path, steps: int, saes: int = 3, **config) -> None:
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert f"done step={steps} " in proc.stdout, proc.stdout
    auxk_steps = int(proc.stdout.split("auxk_steps=")[1].split()[0])
    assert auxk_steps >= steps - 2  # AuxK was active (dead latents) on almost every step
    _assert_close(load_file(str(out)), _reference(steps, saes, **config))


@pytest.fixture(scope="module")
def latent2(tmp_path_factory):
    """The uninterrupted R=2 run (with checkpoints every 5 steps): its output and stdout."""
    tmp = tmp_path_factory.mktemp("latent2")
    proc = run_torchrun(2, "--latent", "2", "--out", str(tmp / "full.safetensors"), "--ckpt", str(tmp / "ckpt"))
    return tmp / "full.safetensors", proc


def test_latent2_equals_single_process(latent2):
    out, proc = latent2
    _check_run(proc, out, N_BATCHES)


@pytest.mark.parametrize("nproc, latent, saes, short", [
    # latent-parallel, R=4: shards of 12,12,11,11 / 6,5,5,5 / 3,2,2,2 latents (slow: R=2 covers the same paths)
    pytest.param(4, 4, 3, None, marks=pytest.mark.slow, id="latent4"),
    # 2-D grid 2 x 2, one SAE (b_dec inside the op, not folded); rank 3's stream ends after 10 batches; a clip
    # norm the gradients exceed, so the norm summed over shards (and data ranks) decides every step
    pytest.param(4, 2, 1, (3, 10), id="grid2x2-short-stream-clipped"),
])
def test_four_ranks_equal_single_process(tmp_path, nproc, latent, saes, short):
    out = tmp_path / "final.safetensors"
    extra = ["--short-rank", str(short[0]), "--short-at", str(short[1])] if short else []
    clip = {"grad_clip": 0.05} if short else {}
    extra += ["--grad-clip", "0.05"] if short else []
    proc = run_torchrun(nproc, "--latent", str(latent), "--saes", str(saes), "--out", str(out), *extra)
    _check_run(proc, out, short[1] if short else N_BATCHES, saes, **clip)


@pytest.fixture(scope="module")
def killed_and_resumed(latent2, tmp_path_factory):
    """(uninterrupted final, resumed final, checkpoint dir) of a 2-rank latent-parallel run killed at batch 12."""
    full = latent2[0]
    tmp = tmp_path_factory.mktemp("latent_resume")
    resumed, ck = tmp / "resumed.safetensors", tmp / "ckpt"
    killed = run_torchrun(2, "--latent", "2", "--out", str(tmp / "never.safetensors"), "--ckpt", str(ck),
                       "--kill-at", "12")
    assert killed.returncode != 0 and not (tmp / "never.safetensors").exists()
    assert [p.name for p in sc.list_complete(ck)] == ["step-000000010"]
    proc = run_torchrun(2, "--latent", "2", "--out", str(resumed), "--ckpt", str(ck), "--resume")
    assert proc.returncode == 0 and f"done step={N_BATCHES} " in proc.stdout, proc.stderr[-4000:]
    return full, resumed, ck


def test_killed_run_resumes_bitwise(killed_and_resumed):
    full, resumed, _ = killed_and_resumed
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())


def test_sharded_checkpoint_loads_in_one_process_and_exports(killed_and_resumed, tmp_path):
    full, _, ck = killed_and_resumed
    final = sc.latest(ck)
    assert final.name == f"step-{N_BATCHES:09d}"  # the end-of-run checkpoint, before rescaling
    saes = sc.load_saes(final)
    expected = load_file(str(full))
    # the trainer folds the norm factor into the biases at the end; load_saes does the same multiplication
    _assert_close(final_tensors(saes), expected, atol=0)
    for fmt in ("dlmscope", "saelens"):
        paths = sc.export(final, tmp_path / fmt, fmt)
        for i, path in enumerate(paths):
            back = TopKSAE.load(path)
            assert (back.n, back.k) == (saes[i].n, saes[i].k)
            assert torch.equal(back.W_dec, saes[i].W_dec) and torch.equal(back.b_enc, saes[i].b_enc)


def test_missing_and_mismatched_shards_are_named(killed_and_resumed, tmp_path):
    _, _, ck = killed_and_resumed
    final = sc.latest(ck)
    broken = tmp_path / "missing" / final.name
    shutil.copytree(final, broken)
    (broken / sc.shard_name(1, 2)).unlink()
    assert sc.list_complete(broken.parent) == []  # not complete: never picked for resume
    with pytest.raises(FileNotFoundError, match=r"shard 1 of 2 .*is missing"):
        sc.load_merged(broken)

    swapped = tmp_path / "swapped" / final.name
    shutil.copytree(final, swapped)
    shutil.copy(swapped / sc.shard_name(0, 2), swapped / sc.shard_name(1, 2))  # shard 0's file under 1's name
    with pytest.raises(ValueError, match="mismatched shards"):
        sc.load_merged(swapped)

    with pytest.raises(FileNotFoundError, match="no meta.json"):
        sc.read_meta(tmp_path)


def test_a_rank_with_the_wrong_shard_stops_every_rank(tmp_path):
    """Rank 1 holds latent rank 0's latents: every rank refuses at construction (none hangs in a collective)."""
    result = run_torchrun(2, "--latent", "2", "--out", str(tmp_path / "x.safetensors"), "--wrong-shard-rank", "1")
    assert result.returncode != 0
    assert "rank 1 refused: SAE 0: this rank (latent rank 1 of 2) must hold latents" in result.stdout
    assert "rank 0 refused: rank(s) [1] hold shards that do not match the grid" in result.stdout


def test_cli_train_latent_parallel_under_torchrun_equals_one_process(tmp_path):
    """`torchrun -m dlmscope.cli train --latent-parallel 2` (one data rank, two latent ranks) trains the same SAEs as
    `dlmscope train --latent-parallel 1` in one process on the same text; rank 0 alone writes the outputs."""
    model = build_tiny_llada(tmp_path / "llada")
    args = ["train", "--model", str(model), "--sentences", "400", "--seq-len", "16", "--lm-batch", "16",
            "--batch-size", "64", "--layers", "1", "--k", "2", "4", "--latents", "21", "--tokens", "640",
            "--eval-tokens", "256", "--warmup", "2", "--log-every", "0", "--checkpoint-every", "4",
            "--norm-batches", "2", "--buffer-tokens", "256"]
    result = run_torchrun(2, *args, "--latent-parallel", "2", "--out", str(tmp_path / "dist"), worker="dlmscope.cli")
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli.main([*args, "--latent-parallel", "1", "--out", str(tmp_path / "one")]) == 0
    for k in (2, 4):
        dist_sae = TopKSAE.load(tmp_path / "dist" / "layer_1" / f"k_{k}")
        one_sae = TopKSAE.load(tmp_path / "one" / "layer_1" / f"k_{k}")
        assert dist_sae.n == 21
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(dist_sae, name), getattr(one_sae, name), atol=1e-6, rtol=0)
    assert (tmp_path / "dist" / "summary.json").is_file()
    assert any((tmp_path / "dist" / "layer_1" / "checkpoints").iterdir())       # the sharded checkpoints


def test_cli_train_data_parallel_under_torchrun_splits_the_harvest(tmp_path):
    """Plain `torchrun -m dlmscope.cli train` (2 data ranks, 2 layers): each rank harvests its own slice into its
    own cache, the tokens are shared out (640 tokens = 5 steps of 2 x 64 rows), rank 0 writes the outputs."""
    model = build_tiny_llada(tmp_path / "llada")
    out = tmp_path / "run"
    result = run_torchrun(2, "train", "--model", str(model), "--sentences", "400", "--seq-len", "16",
                          "--lm-batch", "16", "--batch-size", "64", "--layers", "0", "1", "--k", "2", "--latents", "21",
                          "--tokens", "640", "--eval-tokens", "256", "--warmup", "2", "--log-every", "1",
                          "--norm-batches", "2", "--buffer-tokens", "256", "--out", str(out), worker="dlmscope.cli")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "activation_cache").iterdir()) == ["rank_0", "rank_1"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["layers"]) == {"0", "1"}
    for layer in (0, 1):
        assert TopKSAE.load(out / f"layer_{layer}" / "k_2").n == 21
        steps = sorted(int(p.name.split("-")[1]) for p in (out / f"layer_{layer}" / "checkpoints").iterdir())
        assert steps[-1] == 5
