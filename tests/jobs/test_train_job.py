"""One harvest-and-train path (dlmscope.jobs.train): what the CLI, the demo and the benchmark share."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dlmscope import cli
from dlmscope.data.activations import ActivationStream
from dlmscope.demo import load_world_model
from dlmscope.models import Adapter
from dlmscope.jobs.train import SweepSpec, heldout_activations, make_saes, train_sweep
from dlmscope.train.trainer import TrainConfig, Trainer
from dlmscope.train.log import LogConfig

from tests.helpers.tiny_models import build_tiny_llada, make_llada, single_thread  # noqa: F401  (autouse)

QUIET = LogConfig(log_every=0, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    adapter = make_llada(tmp_path_factory.mktemp("llada"))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 49, (8, 12), generator=gen) for _ in range(60)]
    spec = SweepSpec(layers=(0, 2), ks=(2, 4), n_latents=48, policy="mask", tokens=640, batch_size=64,
                     buffer_tokens=256, seed=5)
    return adapter, batches, spec


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, p), getattr(b, p)) for p in ("W_enc", "b_enc", "W_dec", "b_dec"))


def test_cached_sweep_equals_training_each_layer_from_its_own_harvest(setup, tmp_path):
    adapter, batches, spec = setup
    train = TrainConfig(warmup_steps=2, norm_batches=2)
    got = train_sweep(adapter, batches, spec, train, cache_dir=tmp_path / "cache", log=QUIET)
    assert sorted(got) == [0, 2] and [s.k for s in got[0]] == [2, 4]
    for layer in spec.layers:  # by hand: a live single-layer stream per layer, the same seeds
        stream = ActivationStream(adapter, batches, [layer], "mask", batch_size=64, buffer_tokens=256, seed=5,
                                  max_tokens=640, dtype=torch.float32)
        saes = make_saes(adapter.d_model, spec, layer)
        Trainer(saes, dataclasses.replace(train, total_tokens=640, seed=5), log=QUIET).fit(stream.for_layer(layer))
        assert all(_same(a, b) for a, b in zip(got[layer], saes))
        assert all(s.cfg.meta["trained_tokens"] == 640 and s.cfg.meta["layer"] == layer for s in got[layer])


def test_init_depends_only_on_seed_and_layer(setup):
    adapter, _, spec = setup
    a = make_saes(adapter.d_model, spec, 2)
    b = make_saes(adapter.d_model, dataclasses.replace(spec, layers=(2,)), 2)
    assert all(_same(x, y) for x, y in zip(a, b))
    c = make_saes(adapter.d_model, spec, 0)
    assert not torch.equal(a[0].W_dec, c[0].W_dec)


def test_checkpoints_per_layer_and_exact_resume(setup, tmp_path):
    adapter, batches, spec = setup
    spec = dataclasses.replace(spec, layers=(1,))
    train = TrainConfig(warmup_steps=2, norm_batches=2, checkpoint_every=3)
    first = train_sweep(adapter, batches, spec, train, checkpoint_root=tmp_path, log=QUIET)
    assert (tmp_path / "layer_1" / "checkpoints").is_dir()
    again = train_sweep(adapter, batches, spec, train, checkpoint_root=tmp_path, resume=True, log=QUIET)
    assert all(_same(a, b) for a, b in zip(first[1], again[1]))


def test_21_6_resume_on_other_text_is_refused(setup, tmp_path):
    """The run's identity holds the harvest (model, text, policy): a resume into the same checkpoint folder over
    another text source is refused, naming the difference, before any step."""
    adapter, batches, spec = setup
    spec = dataclasses.replace(spec, layers=(1,))
    train = TrainConfig(warmup_steps=2, norm_batches=2, checkpoint_every=3)
    train_sweep(adapter, batches, spec, train, checkpoint_root=tmp_path, log=QUIET, text_source={"corpus": "a"})
    with pytest.raises(ValueError, match="text"):
        train_sweep(adapter, batches, spec, train, checkpoint_root=tmp_path, resume=True, log=QUIET,
                    text_source={"corpus": "b"})


def test_heldout_is_a_different_corruption_of_the_same_policy(setup):
    adapter, batches, spec = setup
    held = heldout_activations(adapter, batches, spec, tokens=300)
    assert sorted(held) == [0, 2] and held[0].shape == (300, adapter.d_model) and held[0].dtype == torch.float32
    train_rows = next(iter(ActivationStream(adapter, batches, [0], "mask", batch_size=300, buffer_tokens=300,
                                            seed=5, max_tokens=300, drop_last=False)))[0]
    assert not torch.equal(torch.sort(held[0], 0).values, torch.sort(train_rows, 0).values)


def test_bad_specs_name_the_problem(setup):
    adapter, batches, spec = setup
    with pytest.raises(ValueError, match="cache_dir"):
        train_sweep(adapter, batches, spec, log=QUIET)
    with pytest.raises(ValueError, match="leave TrainConfig.steps"):
        train_sweep(adapter, batches, spec, TrainConfig(steps=3), cache_dir="unused", log=QUIET)
    with pytest.raises(ValueError, match="every k must lie in"):
        SweepSpec(layers=(0,), ks=(64,), n_latents=48)
    with pytest.raises(ValueError, match="unknown mask policy"):
        SweepSpec(layers=(0,), ks=(2,), n_latents=48, policy="masked")
    with pytest.raises(ValueError, match="layer"):
        train_sweep(adapter, batches, dataclasses.replace(spec, layers=(7,)), log=QUIET)


# ------------------------------------------------------------------------------ the verb: arguments and cache
REFUSED = "use another cache dir or delete this one"
SMALL = ["--sentences", "300", "--seq-len", "16", "--lm-batch", "8", "--batch-size", "64", "--layers", "0", "1",
         "--k", "2", "--n", "32", "--tokens", "256", "--eval-tokens", "128", "--warmup", "1", "--log-every", "0",
         "--norm-batches", "1", "--buffer-tokens", "256"]


@pytest.fixture(scope="module")
def tiny_llada(tmp_path_factory):
    return build_tiny_llada(tmp_path_factory.mktemp("tiny_llada"))


@pytest.fixture
def no_forward(monkeypatch):
    """Fail any model forward: a refusal must come before the harvest starts."""
    monkeypatch.setattr(Adapter, "forward_until", lambda *a, **k: pytest.fail("the model ran"))


def _train(model, out, *extra) -> int:
    args = SMALL.copy()
    for flag, value in zip(extra[::2], extra[1::2]):  # an extra flag replaces SMALL's
        if flag in args:
            i = args.index(flag)
            args[i:i + 2] = [flag, value]
        else:
            args += [flag, value]
    return cli.main(["train", "--model", str(model), *args, "--out", str(out)])


def test_21_2_train_refuses_the_cache_of_another_model_or_text(tiny_llada, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_llada, out) == 0
    summary = (out / "summary.json").read_text()
    capsys.readouterr()
    world_dlm = load_world_model("dlm").source  # another model (other config, d and weights), same tokenizer
    for extra, differs in (((), "model"), (("--seq-len", "12"), "text.seq_len"),
                           (("--lm-batch", "4"), "text.lm_batch"), (("--sentences", "400"), "text.sentences")):
        model = world_dlm if differs == "model" else tiny_llada
        rc = _train(model, out, *extra)
        err = capsys.readouterr().err
        assert rc == 2 and differs in err and REFUSED in err and "Traceback" not in err, err
    assert (out / "summary.json").read_text() == summary


def test_21_12_train_out_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    rc = cli.main(["train", "--model", str(tmp_path / "no-model"), "--layers", "0", "--out", str(existing)])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "is a file" in err
    assert existing.read_text() == "mine"


def test_21_12_train_huge_n_is_refused_before_the_forward(tiny_llada, tmp_path, capsys, no_forward):
    rc = _train(tiny_llada, tmp_path / "run", "--n", str(10**12))
    err = capsys.readouterr().err
    assert rc == 2 and "--n" in err and "memory" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--n", "--k", "--tokens", "--eval-tokens"])
def test_21_12_train_sizes_below_one_are_refused_by_the_parser(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", "m", "--layers", "0", "--out", "o", flag, "0"])
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_21_17_train_duplicate_k_is_refused(tiny_llada, tmp_path, capsys, no_forward):
    i = SMALL.index("--k")
    rc = cli.main(["train", "--model", str(tiny_llada), *SMALL[:i], "--k", "4", "4", *SMALL[i + 2:],
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "--k" in err and "4" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="duplicate"):
        SweepSpec(layers=(0,), ks=(4, 2, 4), n_latents=48)


@pytest.mark.parametrize("choice", ["centred", "rms"])
def test_train_normalization_option_reaches_the_trainer(choice, tiny_llada, tmp_path, monkeypatch):
    """`--normalization` picks the activation scale (default: around the mean; 'rms': the paper's)."""
    import dlmscope.jobs.train as job

    seen = {}

    def capture(adapter, batches, spec, train, **kw):
        seen["cfg"] = train
        raise SystemExit(0)

    monkeypatch.setattr(job, "train_sweep", capture)
    extra = () if choice == "centred" else ("--normalization", "rms")
    with pytest.raises(SystemExit):
        _train(tiny_llada, tmp_path / "run", *extra)
    assert seen["cfg"].normalization == choice


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "matryoshka"])
def test_train_arch_trains_saves_and_evaluates_that_architecture(arch, tiny_llada, tmp_path, capsys):
    """`dlmscope train --arch` builds, trains, saves (dlmscope.sae.load gives the class back) and evaluates in
    eval mode: each architecture's inference rule."""
    import json

    from dlmscope import sae as S

    extra = ["--prefixes", "8", "16", "32"] if arch == "matryoshka" else ["--l0-coefficient", "0.5"] \
        if arch == "jumprelu" else []
    assert cli.main(["train", "--model", str(tiny_llada), *SMALL, "--arch", arch, *extra,
                     "--out", str(tmp_path / "run")]) == 0
    loaded = S.load(tmp_path / "run" / "layer_0" / "k_2")
    assert type(loaded) is S.CLASSES[arch] and loaded.cfg.arch == arch
    if arch == "matryoshka":
        assert loaded.prefixes == [8, 16, 32]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["layers"]["0"]["2"]["fve"] > 0


def test_train_arch_options_are_checked_before_the_model_loads(tmp_path, capsys):
    missing = str(tmp_path / "no-model")
    for extra, words in ((["--arch", "topk", "--prefixes", "8", "32"], "--prefixes is for --arch matryoshka"),
                         (["--arch", "batchtopk", "--l0-coefficient", "2"], "--l0-coefficient"),
                         (["--arch", "jumprelu", "--latent-parallel", "2"], "--latent-parallel shards Top-K")):
        rc = cli.main(["train", "--model", missing, "--layers", "0", "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and words in err, err
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", missing, "--layers", "0", "--out", "o", "--arch", "relu"])
    with pytest.raises(ValueError, match="prefixes"):
        SweepSpec(layers=(0,), ks=(2,), n_latents=32, arch="matryoshka", prefixes=(8, 16))
    assert SweepSpec(layers=(0,), ks=(2,), n_latents=32, arch="matryoshka").prefixes == (4, 8, 16, 32)
