"""Trainer (dlmscope.train.trainer) and its helpers: schedule, geometric median, checkpoints, config.

Synthetic data only; every test runs in a few seconds on 2 CPU cores.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from dlmscope.train import checkpoint as ckpt
from dlmscope import reference as R
from dlmscope.train.geometric_median import geometric_median, weiszfeld_objective
from dlmscope.sae.topk import TopKSAE
from dlmscope.train.schedule import lr_at, lr_factor
from dlmscope.train.trainer import LogConfig, Trainer, TrainConfig

from tests.helpers.tiny_models import single_thread  # noqa: F401  (autouse: one thread)



def _sparse_stream(n_batches: int, d: int = 32, n_true: int = 64, batch: int = 128, density: float = 0.06,
                   scale: float = 3.0, offset: float = 1.0, noise: float = 0.3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    for _ in range(n_batches):
        codes = (torch.rand(batch, n_true, generator=g) < density) * torch.rand(batch, n_true, generator=g)
        yield codes @ dictionary * scale + offset + noise * torch.randn(batch, d, generator=g)


def _quiet(**overrides) -> TrainConfig:
    base = dict(lr=3e-3, warmup_steps=3, norm_batches=4)
    base.update(overrides)
    return TrainConfig(**base)


def _log(**overrides) -> LogConfig:
    """Metrics every 10 steps, no progress bar."""
    return LogConfig(**{"log_every": 10, "progress": False, **overrides})


# ---- ground truth recovery ---------------------------------------------------------------------------------


def test_recovers_known_sparse_dictionary():
    """Budget: 1000 steps x 256 tokens (256k tokens), d=32, 48 true directions, SAE n=128, k=6."""
    d, n_true, active = 32, 48, 3.0
    g = torch.Generator().manual_seed(1)
    truth = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    shift = torch.randn(d, generator=g)

    def batch(gen, rows):
        on = torch.rand(rows, n_true, generator=gen) < active / n_true
        mags = torch.rand(rows, n_true, generator=gen) + 0.5
        return (on * mags) @ truth * 5 + shift + 0.01 * torch.randn(rows, d, generator=gen)

    def stream(n_batches):
        gen = torch.Generator().manual_seed(2)
        for _ in range(n_batches):
            yield batch(gen, 256)

    sae = TopKSAE(d, 128, 6, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=1000, lr=3e-3, warmup_steps=50, dead_tokens=256 * 50, norm_batches=10)
    Trainer([sae], cfg, log=_log(log_every=0)).fit(stream(1000))
    held_out = batch(torch.Generator().manual_seed(99), 4096)
    with torch.no_grad():
        fve = float(R.fraction_of_variance_explained(held_out, sae(held_out)))
        max_cos = (truth @ sae.W_dec.T).max(dim=1).values
    recovered = float((max_cos > 0.9).float().mean())
    assert fve >= 0.9, f"FVE {fve:.4f}"
    assert recovered >= 0.8, f"recovered {recovered:.3f} of the true directions (max-cos {max_cos.tolist()})"


# ---- the step against a plain-PyTorch transcription of the recipe ----------------------------------------


def _reference_run(sae: TopKSAE, batches: list[torch.Tensor], cfg: TrainConfig, total_steps: int):
    """The paper's recipe written densely with reference.py (no normalisation, no b_dec init)."""
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, p).detach().clone().requires_grad_(True)
                                  for p in ("W_enc", "b_enc", "W_dec", "b_dec"))
    adam = torch.optim.Adam([W_enc, b_enc, b_dec], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    m, v = torch.zeros_like(W_dec), torch.zeros_like(W_dec)
    since = torch.zeros(sae.n, dtype=torch.int64)
    tokens, k_aux = 0, min(sae.d // 2, sae.n)
    aux_seen = False
    for t, x in enumerate(batches):
        lr = lr_at(t, total_steps, cfg.lr, cfg.warmup_steps, cfg.decay_fraction)
        dead = since >= cfg.dead_tokens
        acts = torch.relu(R.pre_activations(x, W_enc, b_enc, b_dec))
        values, indices = acts.topk(sae.k, dim=1)
        e = x - R.sparse_decode(values, indices, W_dec, b_dec)
        loss = e.pow(2).sum(-1).mean()
        if bool(dead.any()):
            aux_seen = True
            a_v, a_i = torch.where(dead, acts, float("-inf")).topk(k_aux, dim=1)
            a_v = torch.where(torch.isinf(a_v), torch.zeros_like(a_v), a_v)
            e_det = e.detach()
            a_hat = R.densify(a_v, a_i, sae.n) @ W_dec
            aux = (e_det - a_hat).pow(2).sum(-1).mean() / (e_det - e_det.mean(0)).pow(2).sum(-1).mean()
            loss = loss + cfg.auxk_alpha * aux
        loss.backward()
        with torch.no_grad():
            W_dec.grad = R.project_out_parallel(W_dec.grad, W_dec)
            torch.nn.utils.clip_grad_norm_([W_enc, b_enc, W_dec, b_dec], cfg.grad_clip)
            for group in adam.param_groups:
                group["lr"] = lr
            adam.step()
            R.decoder_norm_step(W_dec, W_dec.grad, m, v, t + 1, lr, cfg.betas, cfg.eps)
            for p in (W_enc, b_enc, W_dec, b_dec):
                p.grad = None
            fired = torch.zeros(sae.n, dtype=torch.bool)
            fired[indices[values > 0]] = True
            since = torch.where(fired, 0, since + x.shape[0])
            tokens += x.shape[0]
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, since, aux_seen


@pytest.mark.parametrize("group", [True, False])
def test_steps_match_plain_pytorch_recipe(group):
    batches = list(_sparse_stream(15, d=16, batch=64))
    saes = [TopKSAE(16, 48, k, generator=torch.Generator().manual_seed(k)) for k in (3, 5)]
    cfg = _quiet(steps=15, lr=1e-2, dead_tokens=64, normalize_activations=False, init_b_dec=False,
                 decay_fraction=0.4, grad_clip=0.5, group_encoders=group)
    expected = [_reference_run(s, batches, cfg, 15) for s in saes]
    trainer = Trainer(saes, cfg, log=_log())
    trainer.fit(iter(batches))
    for i, (s, (params, since, aux_seen)) in enumerate(zip(saes, expected)):
        assert aux_seen, "the comparison should exercise AuxK"
        for name, value in params.items():
            torch.testing.assert_close(getattr(s, name), value.detach(), atol=2e-5, rtol=1e-4, msg=name)
        group_ = next(g for g in trainer.groups if i in g.members)
        j = group_.members.index(i)
        assert torch.equal(group_.since[group_.offsets[j]:group_.offsets[j + 1]], since)


def test_sweep_grouped_equals_ungrouped():
    """The paper's 6-SAE k sweep (scaled down) as one grouped encoder vs one op call per SAE.

    The two are the same maths in a different float order (b_dec folded into the bias vs subtracted from x), so
    weights agree to ~1e-7 until a near-tie in some top-k selection flips; the tolerance leaves room for that.
    """
    ks = (2, 3, 4, 6, 8, 12)
    results = {}
    for grouped in (True, False):
        saes = [TopKSAE(32, 128, k, generator=torch.Generator().manual_seed(k)) for k in ks]
        trainer = Trainer(saes, _quiet(steps=24, dead_tokens=256, group_encoders=grouped), log=_log())
        assert len(trainer.groups) == (1 if grouped else len(ks))
        trainer.fit(_sparse_stream(30))
        results[grouped] = (saes, trainer.history)
        assert any(r["auxk"] > 0 for h in trainer.history for r in h["sae"])
    for a, b in zip(results[True][0], results[False][0]):
        for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(a, p), getattr(b, p), atol=1e-4, rtol=1e-4)
    for ha, hb in zip(results[True][1], results[False][1]):
        assert [r["dead"] for r in ha["sae"]] == [r["dead"] for r in hb["sae"]]


# ---- normalisation and init --------------------------------------------------------------------------------


def test_norm_factor_folded_into_saved_weights(tmp_path):
    batches = list(_sparse_stream(12, offset=5.0, scale=20.0))
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    trainer = Trainer([sae], _quiet(steps=12, norm_batches=5, checkpoint_dir=str(tmp_path)), log=_log())
    trainer.fit(iter(batches))
    first = torch.cat(batches[:5]).double()
    s = math.sqrt(float((first - first.mean(0)).pow(2).sum(1).mean()))  # the default: root of the total variance
    assert sae.cfg.meta["norm_factor"] == pytest.approx(s, rel=1e-9)
    assert trainer.norm_factor == sae.cfg.meta["norm_factor"]
    # the final checkpoint holds the SAE as trained (on x / s)
    tensors, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert meta["step"] == 12 and meta["norm_factor"] == trainer.norm_factor
    trained = TopKSAE(32, 64, 4)
    with torch.no_grad():
        for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(trained, p).copy_(tensors[f"sae.0.{p}"])
    x = torch.cat(batches[-2:])
    with torch.no_grad():
        torch.testing.assert_close(sae(x), trained(x / s) * s, atol=1e-4, rtol=1e-5)
        v_raw, i_raw = sae.encode(x)
        v_n, i_n = trained.encode(x / s)
        assert torch.equal(i_raw.sort(1).values, i_n.sort(1).values)  # same latents fire
        torch.testing.assert_close(v_raw.sort(1).values, v_n.sort(1).values * s, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(sae.encode_dense(x), trained.encode_dense(x / s) * s, atol=1e-4, rtol=1e-5)
        assert torch.equal(sae.W_dec, trained.W_dec) and torch.equal(sae.W_enc, trained.W_enc)


def test_b_dec_initialised_to_geometric_median_of_first_batch():
    batches = list(_sparse_stream(3))
    sae = TopKSAE(32, 64, 4)
    trainer = Trainer([sae], _quiet(steps=1, lr=0.0, norm_batches=1), log=_log())
    trainer.fit(iter(batches))  # lr 0: one step changes nothing, b_dec stays at the (rescaled) median
    s = trainer.norm_factor
    expected = geometric_median(batches[0] / s) * s
    torch.testing.assert_close(sae.b_dec, expected, atol=1e-5, rtol=1e-5)


def test_geometric_median_against_brute_force():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(30, 2, generator=g), torch.randn(5, 2, generator=g) * 10 + 20])  # outliers
    median = geometric_median(points.double())
    axis = torch.linspace(-1.5, 1.5, 601, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2) + median
    objective = (points.double()[None] - grid[:, None]).norm(dim=-1).sum(-1)
    best = grid[objective.argmin()]
    assert float(weiszfeld_objective(points.double(), median)) <= float(objective.min()) + 1e-9
    assert float((best - median).norm()) <= 0.01
    # far from the mean, which the outliers drag away
    assert float((points.mean(0).double() - median).norm()) > 1.0
    # collinear odd count: the middle point; with one point: that point
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [50.0, 0.0]])
    torch.testing.assert_close(geometric_median(line, max_iter=1000), torch.tensor([2.0, 0.0]), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(geometric_median(line[:1]), line[0])
    with pytest.raises(ValueError):
        geometric_median(torch.tensor([[float("nan"), 0.0]]))


# ---- schedule ------------------------------------------------------------------------------------------------


def test_schedule_values():
    total, warmup = 100, 10
    f = [lr_factor(t, total, warmup, 0.2) for t in range(total)]
    assert f[0] == 0.0 and f[5] == 0.5 and f[10] == 1.0 and f[79] == 1.0
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(1 / 20)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_at(50, total, 3e-4, warmup, 0.2) == pytest.approx(3e-4)
    assert lr_factor(3, 10, 0, 0.0) == 1.0
    # overlapping warmup and decay: the smaller factor wins
    assert lr_factor(4, 10, 8, 0.5) == pytest.approx(min(4 / 8, 6 / 5))
    assert lr_factor(8, 10, 8, 0.5) == pytest.approx(2 / 5)
    with pytest.raises(ValueError):
        lr_factor(0, 0)


# ---- dead latents and AuxK ---------------------------------------------------------------------------------


def _sae_with_muted_latents(n_muted: int, seed: int = 0) -> TopKSAE:
    """Latents n-n_muted.. get encoder rows scaled by 0.05: positive but never in the top-k (dead)."""
    sae = TopKSAE(16, 64, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.W_enc[-n_muted:] *= 0.05
    return sae


def test_dead_counting_and_auxk_revives_dead_latents():
    muted = 24
    runs = {}
    for alpha in (0.0, 1 / 32):
        sae = _sae_with_muted_latents(muted)
        W_enc0 = sae.W_enc.detach().clone()
        trainer = Trainer([sae], _quiet(steps=60, lr=1e-2, auxk_alpha=alpha, dead_tokens=128,
                                        normalize_activations=False, init_b_dec=False, decay_fraction=0.0),
                          log=_log(log_every=1))
        trainer.fit(_sparse_stream(60, d=16, n_true=32, batch=64, offset=0.0, noise=0.5))
        moved = (sae.W_enc.detach() - W_enc0)[-muted:].abs().amax(1)
        runs[alpha] = (trainer, moved)
    no_aux, moved0 = runs[0.0]
    aux, moved1 = runs[1 / 32]
    # without AuxK the muted latents never fire, get no gradient and stay exactly as they were
    assert torch.equal(moved0, torch.zeros_like(moved0))
    since = no_aux.groups[0].since
    assert torch.equal(since[-muted:], torch.full((muted,), no_aux.tokens_seen))
    assert no_aux.history[-1]["sae"][0]["dead"] >= muted
    assert int((since >= 128).sum()) == no_aux.history[-1]["sae"][0]["dead"]
    assert all(r["sae"][0]["auxk"] == 0.0 for r in no_aux.history)
    # with AuxK their encoder rows receive gradient and they come back to life
    assert bool((moved1 > 0).all())
    assert aux.history[-1]["sae"][0]["dead"] < no_aux.history[-1]["sae"][0]["dead"] - muted // 2
    assert any(r["sae"][0]["auxk"] > 0 for r in aux.history)
    # AuxK is exactly off until dead_tokens tokens have been seen
    assert aux.history[0]["sae"][0]["auxk"] == 0.0 and aux.history[1]["sae"][0]["auxk"] == 0.0


# ---- config, bf16, stream length ---------------------------------------------------------------------------


def test_train_config_json_round_trip(tmp_path):
    cfg = TrainConfig(total_tokens=12345, lr=1e-3, betas=(0.8, 0.99), autocast_dtype="bfloat16",
                      checkpoint_dir="/tmp/x", checkpoint_every=7)
    text = cfg.to_json()
    assert TrainConfig.from_json(text) == cfg
    assert TrainConfig.from_dict(json.loads(text)) == cfg
    path = tmp_path / "train.json"
    path.write_text(text)
    assert TrainConfig.from_json(path) == cfg and TrainConfig.from_json(str(path)) == cfg
    assert TrainConfig().lr == 3e-4 and TrainConfig().warmup_steps == 1000 and TrainConfig().decay_fraction == 0.2
    assert TrainConfig().auxk_alpha == 1 / 32 and TrainConfig().dead_tokens == 10_000_000
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"lr": 1.0, "learning_rate": 2.0})
    with pytest.raises(ValueError):
        TrainConfig(autocast_dtype="int8")
    # logging options live in LogConfig; a dict holding both splits into the two, and from_dict names them
    saved = {**cfg.to_dict(), "log_every": 7, "progress": False, "progress_desc": "x", "wandb_project": "p",
             "wandb_run_name": None, "tensorboard_dir": None}
    with pytest.raises(ValueError, match=r"logging options.*split_dict"):
        TrainConfig.from_dict(saved)
    assert TrainConfig.split_dict(saved) == (cfg, LogConfig(log_every=7, progress=False, progress_desc="x",
                                                          wandb_project="p"))
    assert LogConfig.from_dict(LogConfig(log_every=3).to_dict()) == LogConfig(log_every=3)
    with pytest.raises(ValueError, match="unknown"):
        LogConfig.from_dict({"log_every": 1, "log_evry": 2})
    with pytest.raises(ValueError):
        LogConfig(log_every=-1)
    with pytest.raises(TypeError):
        TrainConfig(log_every=10)


def test_bf16_autocast_keeps_fp32_master_weights():
    runs = {}
    for autocast in (None, "bfloat16"):
        saes = [TopKSAE(32, 64, k, generator=torch.Generator().manual_seed(k)) for k in (4, 8)]
        trainer = Trainer(saes, _quiet(steps=40, autocast_dtype=autocast, dead_tokens=256), log=_log())
        trainer.fit(_sparse_stream(40))
        runs[autocast] = (saes, [r["fve"] for r in trainer.history[-1]["sae"]])
    saes, fves = runs["bfloat16"]
    assert all(getattr(s, p).dtype == torch.float32 for s in saes for p in ("W_enc", "b_enc", "W_dec", "b_dec"))
    # bf16 ops really ran (weights differ from fp32 training) and learn as well as fp32
    assert not torch.equal(saes[0].W_enc, runs[None][0][0].W_enc)
    for f_bf16, f_fp32 in zip(fves, runs[None][1]):
        assert abs(f_bf16 - f_fp32) < 0.03, (fves, runs[None][1])
    norms = saes[0].W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_total_tokens_and_short_stream():
    sae = TopKSAE(32, 64, 4)
    trainer = Trainer([sae], _quiet(total_tokens=128 * 10 + 1), log=_log(progress=True))  # with a tqdm bar
    trainer.fit(_sparse_stream(50))
    assert trainer.total_steps == 11 and trainer.step == 11 and trainer.tokens_seen == 128 * 11
    sae = TopKSAE(32, 64, 4)
    trainer = Trainer([sae], _quiet(steps=100), log=_log())
    trainer.fit(_sparse_stream(7))  # the stream ends first: stop cleanly
    assert trainer.step == 7 and sae.cfg.meta["trained_tokens"] == 7 * 128
    trainer = Trainer([TopKSAE(32, 64, 4)], _quiet(), log=_log())
    trainer.fit(list(_sparse_stream(5)))  # no steps / tokens: len(stream)
    assert trainer.step == 5
    with pytest.raises(ValueError, match="steps or total_tokens"):
        Trainer([TopKSAE(32, 64, 4)], _quiet(), log=_log()).fit(_sparse_stream(5))


# ---- bad input ------------------------------------------------------------------------------------------------


def test_wrong_d_raises_with_shapes():
    trainer = Trainer([TopKSAE(32, 64, 4)], _quiet(steps=5), log=_log())
    with pytest.raises(ValueError, match=r"\[128, 16\].*d=32"):
        trainer.fit(_sparse_stream(5, d=16))
    with pytest.raises(ValueError, match="share d"):
        Trainer([TopKSAE(32, 64, 4), TopKSAE(16, 64, 4)])
    with pytest.raises(ValueError, match="empty"):
        Trainer([TopKSAE(32, 64, 4)], _quiet(steps=5), log=_log()).fit(iter([]))


@pytest.mark.parametrize("mode", ["auto", "deferred"])
def test_nan_mid_stream_names_step_and_saves_nothing_half_written(tmp_path, mode):
    def poisoned():
        for i, x in enumerate(_sparse_stream(12)):
            if i == 7:
                x = x.clone()
                x[3, 5] = float("nan")
            yield x

    cfg = _quiet(steps=12, norm_batches=2, checkpoint_dir=str(tmp_path), checkpoint_every=3, nan_check=mode)
    sae = TopKSAE(32, 64, 4)
    with pytest.raises(ValueError, match=r"step 7\b"):
        Trainer([sae], cfg, log=_log(log_every=5)).fit(poisoned())
    names = sorted(p.name for p in tmp_path.iterdir())
    # the checkpoint of step 6 (written before the bad batch) is there and complete; nothing else
    assert names == ["step-000000006"], names
    tensors, meta = ckpt.load_checkpoint(tmp_path / names[0])
    assert meta["step"] == 6 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    t = {"a": torch.arange(4.0)}
    first = ckpt.save_checkpoint(tmp_path, 1, t, {"x": 1})
    assert ckpt.latest_checkpoint(tmp_path) == first

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, t, {"x": 2})
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial step-2, no temp dir
    monkeypatch.undo()
    second = ckpt.save_checkpoint(tmp_path, 2, t, {"x": 2})
    assert [p.name for p in tmp_path.iterdir()] == [second.name]  # keeps the last one only
    tensors, meta = ckpt.load_checkpoint(second)
    assert torch.equal(tensors["a"], t["a"]) and meta == {"x": 2, "step": 2}


def test_resume_in_process_matches_uninterrupted(tmp_path):
    """Same process, resume_from a mid-run checkpoint of a run that was stopped by its stream."""
    batches = list(_sparse_stream(16))
    make = lambda: [TopKSAE(32, 64, k, generator=torch.Generator().manual_seed(k)) for k in (4, 8)]  # noqa: E731
    cfg = _quiet(steps=16, dead_tokens=256, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=5)
    full = Trainer(make(), cfg, log=_log()).fit(iter(batches))
    # a run whose stream stops after 11 batches (last periodic checkpoint: step 10)
    cut = Trainer(make(), cfg.__class__.from_dict({**cfg.to_dict(), "checkpoint_dir": str(tmp_path / "b")}),
                  log=_log())
    cut.fit(iter(batches[:11]))
    resumed = Trainer(make(), cfg.__class__.from_dict({**cfg.to_dict(), "checkpoint_dir": str(tmp_path / "c")}),
                      log=_log())
    resumed.fit(iter(batches), resume_from=tmp_path / "b" / "step-000000011")
    for a, b in zip(full, resumed.saes):
        for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(a, p), getattr(b, p)), p
    assert resumed.step == 16


def test_resume_from_checkpoint_whose_config_has_logging_keys(tmp_path):
    """A checkpoint whose saved config still holds the logging keys (log_every, progress, ...) resumes."""
    batches = list(_sparse_stream(8))
    make = lambda: [TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(4))]  # noqa: E731
    cfg = _quiet(steps=8, dead_tokens=256, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=4)
    full = Trainer(make(), cfg, log=_log()).fit(iter(batches))
    cut = TrainConfig.from_dict({**cfg.to_dict(), "checkpoint_dir": str(tmp_path / "b")})
    Trainer(make(), cut, log=_log()).fit(iter(batches[:5]))  # stopped by its stream: last checkpoint at step 5
    tensors, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b"))
    assert meta["step"] == 5
    meta["config"].update(log_every=100, progress=True, progress_desc="SAE training", wandb_project=None,
                          wandb_run_name=None, tensorboard_dir=None)
    old = ckpt.save_checkpoint(tmp_path / "old", meta["step"], tensors, meta)
    assert TrainConfig.split_dict(ckpt.load_checkpoint(old)[1]["config"])[0] == cut
    saved_cfg, _ = TrainConfig.split_dict({**meta["config"], "checkpoint_dir": str(tmp_path / "c")})
    resumed = Trainer(make(), saved_cfg, log=_log())
    resumed.fit(iter(batches), resume_from=old)
    assert resumed.step == 8
    for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(full[0], p), getattr(resumed.saes[0], p)), p
