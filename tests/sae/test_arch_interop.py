"""BatchTopK / JumpReLU / Matryoshka SAEs in the peer formats (issue 23): real SAELens and dictionary_learning files
load as the right class and reproduce the peer's own outputs; our exports round-trip exactly where the format holds
them; what cannot be represented is refused; and (with the peers) the peers' own loaders read our exports.

The peer check needs sae-lens / dictionary-learning, which are not project dependencies: run it with
``DLMSCOPE_PEER_PYTHON=/path/to/venv/bin/python pytest tests/sae/test_arch_interop.py`` (that venv:
tests/fixtures/make_interop_fixtures.py); without it those tests skip.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmscope import sae as sae_pkg
from dlmscope.sae import formats
from dlmscope.sae.batchtopk import BatchTopKSAE
from dlmscope.sae.jumprelu import JumpReLUSAE
from dlmscope.sae.matryoshka import MatryoshkaSAE
from tests.helpers.peers import run_peer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "interop"
D, N, K, PREFIXES = 16, 64, 4, [8, 24, 64]
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
TOL = dict(rtol=1e-5, atol=1e-5)

#: fixture -> (format, class, k, prefixes)
PEER_FILES = {
    "saelens/jumprelu": ("saelens", JumpReLUSAE, 64, None),
    "saelens/jumprelu_no_b_dec": ("saelens", JumpReLUSAE, 64, None),
    "saelens/batchtopk": ("saelens", BatchTopKSAE, K, None),
    "saelens/batchtopk_training": ("saelens", BatchTopKSAE, K, None),
    "saelens/matryoshka": ("saelens", MatryoshkaSAE, K, PREFIXES),
    "saelens/matryoshka_training": ("saelens", MatryoshkaSAE, K, PREFIXES),
    "dictionary_learning/batchtopk/trainer_0": ("dictionary_learning", BatchTopKSAE, K, None),
    "dictionary_learning/batchtopk_unset/trainer_0": ("dictionary_learning", BatchTopKSAE, K, None),
    "dictionary_learning/matryoshka/trainer_0": ("dictionary_learning", MatryoshkaSAE, K, PREFIXES),
    "dictionary_learning/jumprelu/trainer_0": ("dictionary_learning", JumpReLUSAE, 64, None),
}
#: peer files whose tensors are stored as ours (no fold on load): re-exported to the same bytes' worth
EXACT_REEXPORT = ["saelens/jumprelu", "saelens/batchtopk", "saelens/matryoshka",
                  "dictionary_learning/batchtopk/trainer_0", "dictionary_learning/batchtopk_unset/trainer_0",
                  "dictionary_learning/matryoshka/trainer_0"]


def dense(sae, x: torch.Tensor, *, train: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense code [B, n], reconstruction [B, d]) of x in eval mode (the inference rule) or training mode
    (BatchTopK over the batch; the threshold left alone)."""
    sae.train(train)
    with torch.no_grad():
        values, indices = sae.encode(x, update_threshold=False) if train else sae.encode(x)
        f = values.new_zeros(*values.shape[:-1], sae.n).scatter_(-1, indices, values)
        return f, sae.decode(values, indices)


def make(arch: str, dtype=torch.float32, seed: int = 0):
    """A seeded SAE of ``arch`` off its init: biases, an untied encoder, and a threshold that keeps some latents —
    BatchTopK / Matryoshka's from one training batch, JumpReLU's spread per latent with two of them 0."""
    g = torch.Generator().manual_seed(seed)
    meta = {"layer": 3, "note": "exported by dlmscope"}
    cls = {"batchtopk": BatchTopKSAE, "matryoshka": MatryoshkaSAE, "jumprelu": JumpReLUSAE}[arch]
    kwargs = {"prefixes": PREFIXES} if arch == "matryoshka" else {}
    sae = cls(D, N, 8 if arch == "jumprelu" else K, meta=meta, dtype=dtype, generator=g, **kwargs)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
        sae.W_enc.add_(torch.randn(N, D, generator=g) * 0.05)
        if arch == "jumprelu":
            theta = 0.2 + torch.rand(N, generator=g)
            theta[:2] = 0.0  # log 0 = -inf: a plain ReLU latent
            sae.log_threshold.copy_(theta.log())
        else:
            sae.train()
            sae.encode(torch.randn(32, D, generator=g).to(dtype) * 2)
    return sae.eval()


def batch(seed: int = 5) -> torch.Tensor:
    return torch.randn(8, D, generator=torch.Generator().manual_seed(seed)) * 2


def assert_same_state(a, b, *, close: tuple[str, ...] = (), meta: bool = True) -> None:
    """Two (cfg, tensors) states equal: cfg (its meta unless ``meta=False``) and every tensor bitwise (dtype too),
    except ``close``: b_enc folded with W_enc b_dec and back, equal to two roundings of that sum's magnitude."""
    (cfg_a, ta), (cfg_b, tb) = a, b
    assert (cfg_a if meta else dataclasses.replace(cfg_a, meta={})) == (cfg_b if meta else
                                                                       dataclasses.replace(cfg_b, meta={}))
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        if name in close:
            scale = float((tb["b_enc"].double().abs() + tb["W_enc"].double().abs() @ tb["b_dec"].double().abs()).max())
            atol = 2 * torch.finfo(tb[name].dtype).eps * scale
            torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=atol)
        else:
            assert torch.equal(ta[name], tb[name]), name


# ---- real peer files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PEER_FILES))
def test_peer_file_loads_as_its_class_and_reproduces_the_peer_outputs(name):
    fmt, cls, k, prefixes = PEER_FILES[name]
    path = FIXTURES / name
    assert formats.detect_format(path) == fmt
    sae = sae_pkg.load(path)
    assert type(sae) is cls and (sae.d, sae.n, sae.k) == (D, N, k) and sae.cfg.prefixes == prefixes
    assert sae.cfg.meta["source"]["format"] == fmt
    expected = load_file(str(path / "expected.safetensors"))
    f, x_hat = dense(sae, expected["x"])
    torch.testing.assert_close(f, expected["f"], **TOL)
    torch.testing.assert_close(x_hat, expected["x_hat"], **TOL)
    if "f_train" in expected:  # the peer's BatchTopK rule of training, on the same batch
        f, x_hat = dense(sae, expected["x"], train=True)
        torch.testing.assert_close(f, expected["f_train"], **TOL)
        torch.testing.assert_close(x_hat, expected["x_hat_train"], **TOL)


def test_peer_file_details():
    """What each mapping takes from the peer's file: thresholds, bandwidths, folds, the 'never set' -1."""
    st = load_file(str(FIXTURES / "saelens/batchtopk/sae_weights.safetensors"))
    cfg, t = formats.load(FIXTURES / "saelens/batchtopk")
    assert t["threshold"].shape == () and torch.equal(t["threshold"], st["threshold"][0])
    cfg, t = formats.load(FIXTURES / "saelens/batchtopk_training")
    topk = load_file(str(FIXTURES / "saelens/batchtopk_training/sae_weights.safetensors"))["topk_threshold"]
    assert t["threshold"].dtype == torch.float64 and torch.equal(t["threshold"], topk)
    assert cfg.meta["source"]["folded"] == ["rescale_acts_by_decoder_norm=true"]
    torch.testing.assert_close(t["W_dec"].norm(dim=1), torch.ones(N))
    assert formats.load(FIXTURES / "saelens/jumprelu")[0].meta["jumprelu_bandwidth"] == 0.05
    cfg, t = formats.load(FIXTURES / "saelens/jumprelu_no_b_dec")
    assert cfg.meta["source"]["folded"] == ["apply_b_dec_to_input=false", "2 negative threshold(s) set to 0"]
    assert "jumprelu_bandwidth" not in cfg.meta and float(t["threshold"].min()) == 0.0
    cfg, t = formats.load(FIXTURES / "dictionary_learning/batchtopk_unset/trainer_0")
    assert float(t["threshold"]) == 0.0 and cfg.meta["source"]["threshold"] == -1.0
    assert int(BatchTopKSAE.from_state(cfg, t).threshold_updates) == 0  # training would start its average afresh
    cfg, t = formats.load(FIXTURES / "dictionary_learning/jumprelu/trainer_0")
    assert cfg.meta["jumprelu_bandwidth"] == 0.001 and cfg.meta["source"]["cfg"]["trainer"]["lm_name"] == "tiny-dlm"


def test_a_pre6_saelens_jumprelu_cfg_reads_like_the_v6_one(tmp_path):
    """SAELens 6 cannot write the pre-6 layout; its loader maps it (handle_pre_6_0_config) keeping 'jumprelu'."""
    path = tmp_path / "pre6"
    path.mkdir()
    (path / "sae_weights.safetensors").write_bytes((FIXTURES / "saelens/jumprelu/sae_weights.safetensors").read_bytes())
    (path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": D, "d_sae": N, "dtype": "float32",
                                               "device": "cpu", "model_name": "tiny-dlm", "hook_name": "blocks.3",
                                               "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    (c6, t6), (c5, t5) = formats.load(FIXTURES / "saelens/jumprelu"), formats.load(path)
    assert (c5.arch, c5.k) == (c6.arch, c6.k) and all(torch.equal(t5[key], t6[key]) for key in t6)
    cfg = json.loads((formats.save(c5, t5, tmp_path / "v6", "saelens") / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["model_name"] == "tiny-dlm"


def test_training_checkpoint_and_inference_save_of_one_saelens_sae_agree():
    for name in ("batchtopk", "matryoshka"):
        (ca, ta), (cb, tb) = (formats.load(FIXTURES / "saelens" / sub) for sub in (name, f"{name}_training"))
        assert (ca.arch, ca.k, ca.prefixes) == (cb.arch, cb.k, cb.prefixes)
        for key in ta:  # SAELens folds the decoder norms in float32, we in float64
            torch.testing.assert_close(ta[key], tb[key].to(ta[key].dtype), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", EXACT_REEXPORT)
def test_peer_file_reexports_to_the_same_files(tmp_path, name):
    """formats.load -> formats.save in the same format gives the peer's tensors bitwise and its config."""
    fmt = PEER_FILES[name][0]
    out = formats.save(*formats.load(FIXTURES / name), tmp_path / "out", fmt)
    weights = "sae_weights.safetensors" if fmt == "saelens" else "ae.pt"
    read = (lambda p: load_file(str(p))) if fmt == "saelens" else (lambda p: torch.load(p, weights_only=True))
    a, b = read(FIXTURES / name / weights), read(out / weights)
    assert list(a) == list(b) if fmt == "dictionary_learning" else sorted(a) == sorted(b)  # ae.pt keeps the order
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    config = "cfg.json" if fmt == "saelens" else "config.json"
    assert json.loads((out / config).read_text()) == json.loads((FIXTURES / name / config).read_text())
    if PEER_FILES[name][1] is not JumpReLUSAE:  # through the class too (a JumpReLU's θ passes through a log)
        again = formats.save(*sae_pkg.load(FIXTURES / name).state(), tmp_path / "via_class", fmt)
        assert json.loads((again / config).read_text()) == json.loads((FIXTURES / name / config).read_text())


def test_folded_peer_files_reexport_equal_up_to_the_fold(tmp_path):
    """Files whose b_dec is not applied to the input, and with negative thresholds: the same SAE comes back (the
    provenance differs: what was folded is no longer in the file)."""
    for name in ("saelens/jumprelu_no_b_dec", "dictionary_learning/jumprelu/trainer_0"):
        fmt = PEER_FILES[name][0]
        state = formats.load(FIXTURES / name)
        out = formats.save(*state, tmp_path / name, fmt)
        assert_same_state(formats.load(out), state, close=("b_enc",), meta=False)
        if fmt == "saelens":  # written in our layout: b_dec applied to the input, the peer's metadata kept
            cfg = json.loads((out / "cfg.json").read_text())
            assert cfg["apply_b_dec_to_input"] is True and "training_architecture" not in cfg["metadata"]


def test_saelens_training_checkpoint_reexports_as_saelens_inference_save(tmp_path):
    """A batchtopk training checkpoint written back is the jumprelu file SAELens's save_inference_model makes."""
    for name in ("batchtopk", "matryoshka"):
        out = formats.save(*formats.load(FIXTURES / "saelens" / f"{name}_training"), tmp_path / name, "saelens")
        assert json.loads((out / "cfg.json").read_text()) == json.loads(
            (FIXTURES / "saelens" / name / "cfg.json").read_text())
        ours, theirs = (load_file(str(p / "sae_weights.safetensors")) for p in (out, FIXTURES / "saelens" / name))
        for key in theirs:
            torch.testing.assert_close(ours[key].float(), theirs[key], rtol=1e-6, atol=1e-6)


# ---- our exports: exact round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", ["saelens", "dictionary_learning", "dlmscope"])
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "jumprelu"])
def test_round_trip(tmp_path, arch, fmt, dtype):
    sae = make(arch, dtype)
    state = sae.state()
    out = formats.save(*state, tmp_path / "ckpt", fmt)
    assert formats.detect_format(out) == fmt
    # exact, but for dictionary_learning's JumpReLU b_enc, which that class stores without b_dec's share
    close = ("b_enc",) if (arch, fmt) == ("jumprelu", "dictionary_learning") else ()
    assert_same_state(formats.load(out), state, close=close)
    loaded = sae_pkg.load(out)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    x = batch().to(dtype)
    tol = dict(rtol=0, atol=0) if not close else TOL if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(dense(loaded, x), dense(sae, x)):
        torch.testing.assert_close(a, b, **tol)


def test_chain_through_every_format(tmp_path):
    for arch in ("batchtopk", "matryoshka", "jumprelu"):
        state = start = make(arch).state()
        for i, fmt in enumerate(["saelens", "dictionary_learning", "dlmscope", "saelens", "dictionary_learning"]):
            state = formats.load(formats.save(*state, tmp_path / f"{arch}{i}", fmt))
        assert_same_state(state, start, close=("b_enc",) if arch == "jumprelu" else ())


def test_a_jumprelu_k_and_bandwidth_travel_in_the_peer_configs(tmp_path):
    sae = make("jumprelu")
    assert sae.k == 8 and sae.cfg.meta["jumprelu_bandwidth"] == 0.05
    cfg = json.loads((formats.save(*sae.state(), tmp_path / "sl", "saelens") / "cfg.json").read_text())
    assert cfg["dlmscope_k"] == 8 and cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture_details"] == {"jumprelu_bandwidth": 0.05}
    dl = formats.save(*sae.state(), tmp_path / "dl", "dictionary_learning")
    config = json.loads((dl / "config.json").read_text())
    assert config["dlmscope_k"] == 8 and config["trainer"]["bandwidth"] == 0.05
    assert config["trainer"]["dict_class"] == "JumpReluAutoEncoder"
    for name in ("batchtopk", "matryoshka"):
        cfg = json.loads((formats.save(*make(name).state(), tmp_path / name, "saelens") / "cfg.json").read_text())
        details = cfg["metadata"]["training_architecture_details"]
        assert details == ({"k": K} if name == "batchtopk" else {"k": K, "matryoshka_widths": PREFIXES})


def test_dictionary_learning_without_config_tells_the_class_by_its_tensors(tmp_path):
    for arch in ("matryoshka", "jumprelu"):
        sae = make(arch)
        out = formats.save(*sae.state(), tmp_path / arch, "dictionary_learning")
        (out / "config.json").unlink()
        cfg, _ = formats.load(out)
        assert (cfg.arch, cfg.prefixes) == (arch, sae.cfg.prefixes)


# ---- what is refused --------------------------------------------------------------------------------------------


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit(path: Path, fn) -> None:
    if path.suffix == ".pt":
        state = torch.load(path, weights_only=True)
        fn(state)
        torch.save(state, path)
    else:
        tensors = load_file(str(path))
        fn(tensors)
        save_file(tensors, str(path))


def _details(c):
    return c["metadata"]["training_architecture_details"]


REFUSED = {  # fixture, file, edit, error
    "saelens gated": ("saelens/jumprelu", "cfg.json", lambda c: c.update(architecture="gated"),
                      r"cfg.json: SAELens architecture 'gated' is not supported"),
    "saelens training k": ("saelens/batchtopk_training", "cfg.json", lambda c: c.update(k=4.5),
                           r"cfg.json: SAELens batchtopk k=4.5 is not an integer"),
    "saelens widths": ("saelens/matryoshka_training", "cfg.json", lambda c: c.update(matryoshka_widths=[24, 8]),
                       r"cfg.json: matryoshka_widths=\[24, 8\] must be increasing"),
    "saelens no threshold": ("saelens/jumprelu", "sae_weights.safetensors", lambda t: t.pop("threshold"),
                             r"cfg.json: SAELens architecture 'jumprelu' is not a Top-K SAE and needs the"),
    "saelens threshold shape": ("saelens/jumprelu", "sae_weights.safetensors",
                                lambda t: t.update(threshold=t["threshold"][:8].clone()),
                                r"sae_weights.safetensors: tensor 'threshold' has shape \[8\], expected \[64\]"),
    "saelens NaN topk_threshold": ("saelens/batchtopk_training", "sae_weights.safetensors",
                                   lambda t: t.update(topk_threshold=torch.tensor(float("nan"), dtype=torch.float64)),
                                   r"tensor 'topk_threshold' has 1 non-finite value"),
    "saelens normalised": ("saelens/batchtopk", "cfg.json", lambda c: c.update(normalize_activations="layer_norm"),
                           r"normalize_activations='layer_norm' is not supported"),
    "dl gated": ("dictionary_learning/jumprelu/trainer_0", "config.json",
                 lambda c: c["trainer"].update(dict_class="GatedAutoEncoder"),
                 r"config.json: dict_class 'GatedAutoEncoder' is not supported"),
    "dl group sizes": ("dictionary_learning/matryoshka/trainer_0", "ae.pt",
                       lambda s: s.update(group_sizes=torch.tensor([8, 16, 8])),
                       r"ae.pt: group_sizes \[8, 16, 8\] must be positive and sum to dict_size=64"),
    "dl group sizes vs config": ("dictionary_learning/matryoshka/trainer_0", "config.json",
                                 lambda c: c["trainer"].update(group_sizes=[16, 8, 40]),
                                 r"ae.pt: buffer group_sizes=\[8, 16, 40\] disagrees with config.json"),
    "dl jumprelu threshold": ("dictionary_learning/jumprelu/trainer_0", "ae.pt",
                              lambda s: s.update(threshold=torch.tensor(0.5)),
                              r"ae.pt: tensor 'threshold' has shape \[\], expected \[64\]"),
    "dl batchtopk threshold": ("dictionary_learning/batchtopk/trainer_0", "ae.pt",
                               lambda s: s.update(threshold=torch.ones(3)),
                               r"ae.pt: tensor 'threshold' has shape \[3\], expected \[\]"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_represented_is_refused(tmp_path, case):
    name, file, edit, pattern = REFUSED[case]
    path = tmp_path / "ckpt"
    path.mkdir()
    for f in (FIXTURES / name).iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    (_edit_json if file.endswith(".json") else _edit)(path / file, edit)
    with pytest.raises(ValueError, match=pattern) as info:
        formats.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("edit, why", [
    (lambda c: _details(c).update(k=4.5), "training k=4.5 is not an integer"),
    (lambda c: _details(c).update(matryoshka_widths="x"), "matryoshka_widths='x' are not increasing"),
])
def test_a_saelens_batchtopk_file_it_cannot_be_is_read_as_the_jumprelu_it_is(tmp_path, edit, why):
    path = formats.save(*formats.load(FIXTURES / "saelens/matryoshka"), tmp_path / "m", "saelens")
    _edit_json(path / "cfg.json", edit)
    cfg, t = formats.load(path)
    assert cfg.arch == "jumprelu" and t["threshold"].shape == (N,) and why in cfg.meta["source"]["note"]
    _edit(path / "sae_weights.safetensors", lambda w: w["threshold"].__setitem__(0, 9.0))
    _edit_json(path / "cfg.json", lambda c: _details(c).update(k=4, matryoshka_widths=PREFIXES))
    cfg, _ = formats.load(path)  # a threshold that differs between latents
    assert cfg.arch == "jumprelu" and "threshold differs between latents" in cfg.meta["source"]["note"]


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "jumprelu"])
def test_sparsify_refuses_them_before_writing(tmp_path, arch):
    with pytest.raises(ValueError, match=f"cannot save a {arch} SAE in the sparsify format"):
        formats.save(*make(arch).state(), tmp_path / "x", "sparsify")
    assert not (tmp_path / "x").exists()


FUZZ_FILES = {"saelens": ("cfg.json", "sae_weights.safetensors"), "dictionary_learning": ("config.json", "ae.pt")}


def _fuzz_params():
    for name in ("saelens/jumprelu", "saelens/matryoshka", "saelens/batchtopk_training",
                 "dictionary_learning/batchtopk/trainer_0", "dictionary_learning/matryoshka/trainer_0",
                 "dictionary_learning/jumprelu/trainer_0"):
        yield from (pytest.param(name, file, id=f"{name}:{file}") for file in FUZZ_FILES[PEER_FILES[name][0]])
    for arch in ("batchtopk", "matryoshka", "jumprelu"):
        for fmt, files in FUZZ_FILES.items():
            yield from (pytest.param(f"{fmt}:{arch}", file, id=f"ours/{fmt}/{arch}:{file}") for file in files)


@pytest.mark.parametrize("source, file", list(_fuzz_params()))
def test_mutated_files_raise_only_value_errors_naming_the_file(tmp_path, source, file):
    """tests/test_fuzz_loaders.py's mutations, on these architectures' peer files and our exports."""
    from tests.test_fuzz_loaders import mutations
    rng = random.Random(zlib.crc32(f"{source}/{file}".encode()))
    bad = []
    for i in range(12):
        seed, mutate = rng.randrange(2 ** 32), rng.choice(mutations(file))
        folder = tmp_path / str(i)
        if ":" in source:  # one of our exports
            fmt, arch = source.split(":")
            formats.save(*make(arch, seed=i).state(), folder, fmt)
        else:
            folder.mkdir()
            for f in FUZZ_FILES[PEER_FILES[source][0]]:
                (folder / f).write_bytes((FIXTURES / source / f).read_bytes())
            if (folder / "ae.pt").exists():  # the mutators view tensors flat: store them contiguous
                state = torch.load(folder / "ae.pt", weights_only=True)
                torch.save({k: v.contiguous() for k, v in state.items()}, folder / "ae.pt")
        target = folder / file
        target.write_bytes(mutate(random.Random(seed), target.read_bytes(), target))
        try:
            sae_pkg.load(folder)
        except (ValueError, FileNotFoundError) as e:
            if str(folder) not in str(e):
                bad.append(f"case {i} ({mutate.__name__}): {type(e).__name__} not naming {folder}: {str(e)[:300]}")
        except Exception as e:  # anything else is a bug
            bad.append(f"case {i} ({mutate.__name__}): {type(e).__name__}: {str(e)[:300]}")
    assert not bad, "\n".join(bad)


# ---- our exports, read by the peer libraries themselves (optional) ---------------------------------------------

_PEER_BODY = """
out = {}
if case.startswith("saelens"):
    from sae_lens import SAE
    sae = SAE.load_from_disk(path)
    out["f"] = sae.encode(x)
    out["x_hat"] = sae.decode(out["f"])
else:
    from dictionary_learning.utils import load_dictionary
    sae, _config = load_dictionary(str(path), device="cpu")
    out["x_hat"], out["f"] = sae(x, output_features=True)
    if "jumprelu" not in case:  # its training rule: BatchTopK over the batch
        out["f_train"] = sae.encode(x, use_threshold=False)
        out["x_hat_train"] = sae.decode(out["f_train"])
name = type(sae).__name__
"""

PEER_CASES = {f"{fmt}_{arch}": (fmt, arch) for fmt in ("saelens", "dl") for arch in ("batchtopk", "matryoshka",
                                                                                      "jumprelu")}
PEER_CLASSES = {"saelens": "JumpReLUSAE", "dl_batchtopk": "BatchTopKSAE", "dl_matryoshka": "MatryoshkaBatchTopKSAE",
                "dl_jumprelu": "JumpReluAutoEncoder"}


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory):
    python = os.environ.get("DLMSCOPE_PEER_PYTHON")
    if not python:
        pytest.skip("set DLMSCOPE_PEER_PYTHON to a python with sae-lens and dictionary-learning "
                    "(see tests/fixtures/make_interop_fixtures.py) to check our exports with the peers' loaders")
    root = tmp_path_factory.mktemp("arch_export")
    x = batch(7)
    save_file({"x": x}, str(root / "x.safetensors"))
    saes = {}
    for case, (fmt, arch) in PEER_CASES.items():
        saes[case] = make(arch, seed=len(saes))
        formats.save(*saes[case].state(), root / case, "saelens" if fmt == "saelens" else "dictionary_learning")
    # a SAELens training checkpoint, exported by us as the inference file
    formats.save(*formats.load(FIXTURES / "saelens/matryoshka_training"), root / "saelens_from_training", "saelens")
    cases = [*PEER_CASES, "saelens_from_training"]
    return saes, x, root, run_peer(python, root, _PEER_BODY, cases)


@pytest.mark.parametrize("case", sorted(PEER_CASES))
def test_the_peer_loads_our_export_and_reconstructs_like_ours(peer_run, case):
    saes, x, root, report = peer_run
    assert report[case] == PEER_CLASSES.get(case, PEER_CLASSES["saelens"]), report[case]
    out = load_file(str(root / f"{case}.out.safetensors"))
    f, x_hat = dense(saes[case], x)
    assert bool((f != 0).any()) and bool((f == 0).any())  # a code that is neither empty nor full
    torch.testing.assert_close(out["f"], f, **TOL)
    torch.testing.assert_close(out["x_hat"], x_hat, **TOL)
    if "f_train" in out:
        f, x_hat = dense(saes[case], x, train=True)
        torch.testing.assert_close(out["f_train"], f, **TOL)
        torch.testing.assert_close(out["x_hat_train"], x_hat, **TOL)


def test_the_peer_reads_a_training_checkpoint_we_rewrote_as_its_inference_save(peer_run):
    _, x, root, report = peer_run
    assert report["saelens_from_training"] == "JumpReLUSAE", report["saelens_from_training"]
    out = load_file(str(root / "saelens_from_training.out.safetensors"))
    sae = sae_pkg.load(FIXTURES / "saelens/matryoshka_training")
    f, x_hat = dense(sae, x)
    torch.testing.assert_close(out["f"], f, **TOL)
    torch.testing.assert_close(out["x_hat"], x_hat, **TOL)
