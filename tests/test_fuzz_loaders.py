"""Every loader of files on disk, fed mutated files: only ``ValueError`` / ``FileNotFoundError`` naming the file (or
its folder) may come out, never a ``TypeError``, ``KeyError``, ``RecursionError``, ``SafetensorError``...

The loaders: the four SAE checkpoint formats (:meth:`dlmscope.sae.topk.TopKSAE.load`), trainer checkpoints
(:func:`dlmscope.train.checkpoint.load_checkpoint`), the activation cache (:func:`dlmscope.data.cache.read_cache`,
which checks the index with :func:`~dlmscope.data.cache.load_cache_index`) and the feature report
(:func:`dlmscope.interp.report.read_report`, then :func:`~dlmscope.interp.dashboard.write_dashboard` on what it
accepts). Each file of a valid instance is mutated :data:`CASES` times from a fixed seed: truncated, bytes
flipped, JSON values replaced by values of other types (deep nesting, NaN and Infinity constants among them) or
deleted, tensors dropped, reshaped to broadcastable shapes, recast, made non-finite, or replaced by non-tensors.
A mutation the loader accepts is fine (not every change is an error); an exception must be one of the two and
name the file.
"""
from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmscope.data.cache import read_cache, write_cache
from dlmscope.interp.dashboard import write_dashboard
from dlmscope.interp.report import read_report
from dlmscope.sae.topk import TopKSAE
from dlmscope.train.checkpoint import META_FILE, STATE_FILE, load_checkpoint, save_checkpoint

SEED = 2112
#: mutations per file
CASES = 32

#: values a JSON value is replaced with; the ``__...__`` strings become raw text that is not a plain JSON value
WRONG = [None, [], {}, "", "x", 0, -1, 1.5, True, 10 ** 30, [[1, 2]], {"a": {"b": []}}, "__DEEP__", "__NAN__",
         "__INF__", "1" * 5000]
RAW = {'"__DEEP__"': "[" * 100_000 + "]" * 100_000, '"__NAN__"': "NaN", '"__INF__"': "-Infinity"}
DTYPES = [torch.int32, torch.bool, torch.complex64, torch.float16, torch.uint8]


# ---- valid instances ----------------------------------------------------------------------------------------


def sae_checkpoint(fmt: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        sae = TopKSAE(8, 16, 4, meta={"norm_factor": 1.5, "layer": 2}, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            sae.b_enc.add_(0.1)
        return sae.save(folder / "sae", fmt)
    return make


def trainer_checkpoint(folder: Path) -> Path:
    tensors = {"sae0.W_enc": torch.randn(16, 8), "sae0.b_dec": torch.zeros(8), "step": torch.tensor(7)}
    return save_checkpoint(folder / "ckpt", 7, tensors, {"norm_factor": 1.5, "tokens_seen": 700, "d": 8})


def activation_cache(folder: Path) -> Path:
    chunks = [{0: torch.randn(12, 8), 2: torch.randn(12, 8)} for _ in range(3)]
    for _ in write_cache(chunks, folder / "cache", shard_tokens=20, meta={"source": "m", "policy": "mask"}):
        pass
    return folder / "cache"


def feature_report(folder: Path) -> Path:
    window = {"tokens": ["a", "<b>", "c"], "values": [0.0, 2.0, 0.5], "centre": 1}
    entry = {"latent": 3, "frequency": 0.01, "n_fired": 10, "max_act": 2.0, "top": [window, window],
             "importance": [window], "histogram": {"edges": [0.1, 1.0, 10.0], "counts": [3, 7]},
             "logits": {"promoted": [["x", 1.0]], "suppressed": [["y", -1.0]]},
             "masked": {"frequency": 0.02, "n_fired": 4, "max_act": 1.0, "top": [{**window, "hidden": "p"}],
                        "hidden_tokens": [["p", 2]]},
             "interp": {"explanation": "letters", "accuracy": 0.5, "judge": "planted"},
             "concept": {"name": "letters", "f1": 0.7}}
    report = {"model": "m", "layer": 4, "policy": "mask", "n_latents": 16, "k": 4, "tokens_seen": 100,
              "is_diffusion": True, "latents": {"3": entry, "5": {**entry, "latent": 5}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    return folder


def load_report(folder: Path) -> None:
    report = read_report(folder / "report.json")
    write_dashboard(report, folder / "site")


#: name -> (make a valid instance under a folder: its path, load it, the files to mutate)
LOADERS: dict[str, tuple[Callable[[Path], Path], Callable[[Path], object], tuple[str, ...]]] = {
    "sae/dlmscope": (sae_checkpoint("dlmscope"), TopKSAE.load, ("cfg.json", "sae.safetensors")),
    "sae/saelens": (sae_checkpoint("saelens"), TopKSAE.load, ("cfg.json", "sae_weights.safetensors")),
    "sae/sparsify": (sae_checkpoint("sparsify"), TopKSAE.load, ("cfg.json", "sae.safetensors")),
    "sae/dictionary_learning": (sae_checkpoint("dictionary_learning"), TopKSAE.load, ("config.json", "ae.pt")),
    "trainer": (trainer_checkpoint, load_checkpoint, (META_FILE, STATE_FILE)),
    "cache": (activation_cache, lambda p: list(read_cache(p)), ("index.json", "shard_00000.safetensors")),
    "report": (feature_report, load_report, ("report.json",)),
}

# ---- mutations ----------------------------------------------------------------------------------------------


def truncate(rng: random.Random, data: bytes, path: Path) -> bytes:
    return data[:rng.randrange(len(data))]


def flip(rng: random.Random, data: bytes, path: Path) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):  # mostly in the header, where the structure is
        pos = rng.randrange(min(len(out), 256) if rng.random() < 0.7 else len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def _json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _json_paths(v, prefix + (i,))


def json_value(rng: random.Random, data: bytes, path: Path) -> bytes:
    """Replace one value (possibly the whole document) by a value of another type, or delete one key."""
    obj = json.loads(data)
    at = rng.choice(list(_json_paths(obj)))
    if not at:
        obj = rng.choice(WRONG)
    else:
        parent = obj
        for key in at[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.3:
            del parent[at[-1]]
        else:
            parent[at[-1]] = rng.choice(WRONG)
    text = json.dumps(obj)
    for sentinel, raw in RAW.items():
        text = text.replace(sentinel, raw)
    return text.encode()


def _tensor_change(rng: random.Random, tensors: dict) -> dict:
    names = [k for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    name = rng.choice(names)
    t = tensors[name]
    what = rng.choice(["drop", "rename", "broadcast", "transpose", "dtype", "nonfinite", "scalar", "extra"])
    if what == "drop":
        del tensors[name]
    elif what == "rename":
        tensors[name + "_x"] = tensors.pop(name)
    elif what == "broadcast" and t.dim() >= 1:
        tensors[name] = t[:1].contiguous()
    elif what == "transpose" and t.dim() == 2:
        tensors[name] = t.T.contiguous()
    elif what == "dtype":
        tensors[name] = t.to(rng.choice(DTYPES))
    elif what == "nonfinite" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf")])
        tensors[name] = t
    elif what == "scalar":
        tensors[name] = torch.tensor(rng.choice([0, -1, 2 ** 40, 0.5]))
    else:
        tensors["extra"] = torch.zeros(rng.choice([(1,), (3, 3), (0,)]))
    return tensors


def tensors(rng: random.Random, data: bytes, path: Path) -> bytes:
    """One tensor-level change, the file rewritten by its own format's writer."""
    scratch = path.with_name(path.name + ".scratch")
    scratch.write_bytes(data)
    if path.suffix == ".pt":
        state = torch.load(scratch, weights_only=True)
        if rng.random() < 0.25:  # a value that is no tensor at all
            state[rng.choice(list(state))] = rng.choice([3, "x", [1, 2], None, {"a": 1}])
        else:
            state = _tensor_change(rng, state)
        torch.save(state if rng.random() > 0.05 else list(state.values()), scratch)
    else:
        save_file(_tensor_change(rng, load_file(scratch)), scratch)
    out = scratch.read_bytes()
    scratch.unlink()
    return out


def mutations(file: str) -> list:
    if file.endswith(".json"):
        return [truncate, flip, json_value, json_value, json_value]
    return [truncate, flip, tensors, tensors]


def cases(loader: str, file: str) -> list[tuple[int, Callable]]:
    """(seed, mutation) of each case of ``file`` of ``loader``: fixed by :data:`SEED`."""
    rng = random.Random(SEED + zlib.crc32(f"{loader}/{file}".encode()))
    return [(rng.randrange(2 ** 32), rng.choice(mutations(file))) for _ in range(CASES)]


def params():
    for loader, (_, _, files) in LOADERS.items():
        for file in files:
            yield pytest.param(loader, file, id=f"{loader}:{file}")


# ---- the test -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader, file", list(params()))
def test_mutated_files_raise_only_value_or_file_not_found_errors_naming_the_file(tmp_path, loader, file):
    make, load, _ = LOADERS[loader]
    bad = []
    for i, (seed, mutate) in enumerate(cases(loader, file)):
        folder = make(tmp_path / str(i))
        target = folder / file
        original = target.read_bytes()
        mutated = mutate(random.Random(seed), original, target)
        target.write_bytes(mutated)
        try:
            load(folder)
        except (ValueError, FileNotFoundError) as e:
            if str(folder) not in str(e):
                bad.append(f"case {i} ({mutate.__name__}): {type(e).__name__} not naming {folder}: {str(e)[:300]}")
        except Exception as e:  # any other exception is what this test looks for
            bad.append(f"case {i} ({mutate.__name__}): {type(e).__name__}: {str(e)[:300]}")
    assert not bad, f"{loader} with a mutated {file}:\n" + "\n".join(bad)
