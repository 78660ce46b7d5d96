"""Write tiny real checkpoints of the peer SAE libraries into tests/fixtures/interop/.

Each checkpoint is written by the library's **own** save code, and beside it ``expected.safetensors`` holds one
input batch ``x [B, d]`` and that library's own outputs on it: ``x_hat [B, d]`` and the dense top-k code
``f [B, n]`` (zeros off the k active latents). ``tests/sae/test_formats.py`` loads each checkpoint with
``dlmscope.sae.formats.load`` and checks that it reproduces these outputs.

Run it in a separate virtual environment holding the peers (their dependencies must not touch the project's):

    python3 -m venv /tmp/peers
    /tmp/peers/bin/pip install torch==2.13.0
    /tmp/peers/bin/pip install eai-sparsify sae-lens
    /tmp/peers/bin/pip install --no-deps dictionary-learning nnsight zstandard
    /tmp/peers/bin/pip install greenlet        # nnsight (imported by dictionary_learning/__init__) needs it
    /tmp/peers/bin/python scripts/make_interop_fixtures.py

This script imports nothing of dlmscope. Shapes: d=16, n=64, k=4, B=8 (every file a few KB). Deterministic
(fixed seeds); the library versions used are recorded in tests/fixtures/interop/README.md.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "interop"
D, N, K, B = 16, 64, 4, 8


def _randomise(generator: torch.Generator, *tensors: torch.Tensor, scale: float = 0.1) -> None:
    """Give biases (initialised to zero by every library) non-trivial values, so the tests see them."""
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * scale)


def _batch(seed: int) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed)) * 2.0


def _write_expected(directory: Path, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, **extra) -> None:
    assert f.shape == (B, N) and int((f != 0).sum(-1).max()) <= K
    tensors = {"x": x, "x_hat": x_hat, "f": f}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / "expected.safetensors"),
              metadata={k: str(v) for k, v in extra.items()})


def _fresh(sub: str) -> Path:
    path = ROOT / sub
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ---- sparsify --------------------------------------------------------------------------------------------------


def make_sparsify() -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(10)
    # num_latents=0 -> n = d_in * expansion_factor, the library's default way of sizing
    sae = SparseCoder(D, SparseCoderConfig(expansion_factor=N // D, num_latents=0, k=K), device="cpu")
    _randomise(g, sae.encoder.bias, sae.b_dec)
    # sparsify's trainer layout is <run>/<hookpoint>/{cfg.json, sae.safetensors}
    hook_dir = _fresh("sparsify") / "layers.3"
    sae.save_to_disk(hook_dir)
    x = _batch(11)
    with torch.no_grad():
        top_acts, top_indices, _ = sae.encode(x)
        x_hat = sae.decode(top_acts, top_indices)
    f = torch.zeros(B, N).scatter_(-1, top_indices, top_acts)
    _write_expected(hook_dir, x, x_hat, f)


# ---- SAELens ---------------------------------------------------------------------------------------------------


def _saelens_outputs(sae, x):
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    return x_hat, f


def make_saelens() -> None:
    from sae_lens import SAE, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    root = _fresh("saelens")
    g = torch.Generator().manual_seed(20)

    # 1. the plain inference Top-K SAE
    torch.manual_seed(1)
    metadata = SAEMetadata(model_name="tiny-dlm", hook_name="blocks.3.hook_resid_post")
    cfg = TopKSAEConfig(d_in=D, d_sae=N, k=K, metadata=metadata)
    sae = TopKSAE(cfg)
    _randomise(g, sae.b_enc, sae.b_dec)
    path = root / "topk"
    sae.save_model(path)
    x = _batch(21)
    x_hat, f = _saelens_outputs(SAE.load_from_disk(path), x)  # outputs of the SAE as SAELens reads it back
    _write_expected(path, x, x_hat, f)

    # 2. decoder-norm rescaling + no b_dec on the input: options dlmscope folds into the weights on load
    torch.manual_seed(2)
    cfg = TopKSAEConfig(d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)
    sae = TopKSAE(cfg)
    _randomise(g, sae.b_enc, sae.b_dec)
    with torch.no_grad():  # decoder rows of assorted norms, so the rescaling matters
        sae.W_dec.mul_(torch.rand(N, 1, generator=g) * 1.5 + 0.25)
    path = root / "topk_rescaled"
    sae.save_model(path)
    x = _batch(22)
    x_hat, f = _saelens_outputs(SAE.load_from_disk(path), x)
    _write_expected(path, x, x_hat, f)

    # 3. the pre-6.0 config layout (architecture "standard" + activation_fn_str "topk" + activation_fn_kwargs.k),
    #    which this SAELens version cannot write any more: the config is written by hand to that documented layout,
    #    the weights by SAELens, and the expected outputs come from SAELens' own loader (which converts the
    #    old layout itself).
    torch.manual_seed(3)
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=K))
    _randomise(g, sae.b_enc, sae.b_dec)
    path = root / "legacy_pre6"
    sae.save_model(path)
    legacy_cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "tiny-dlm",
        "hook_name": "blocks.3.hook_resid_post",
        "hook_layer": 3,
        "hook_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "",
        "context_size": 128,
        "normalize_activations": "none",
    }
    (path / "cfg.json").write_text(json.dumps(legacy_cfg, indent=2) + "\n")
    x = _batch(23)
    x_hat, f = _saelens_outputs(SAE.load_from_disk(path), x)
    _write_expected(path, x, x_hat, f)


# ---- dictionary_learning (the DLM-Scope paper's format) ---------------------------------------------------------


def make_dictionary_learning() -> None:
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer

    g = torch.Generator().manual_seed(30)
    # the trainer builds the AutoEncoderTopK and owns the config layout that training.py writes
    trainer = TopKTrainer(steps=2000, activation_dim=D, dict_size=N, k=K, layer=3, lm_name="tiny-dlm", seed=4,
                          device="cpu", submodule_name="resid_post_layer_3")
    ae = trainer.ae
    _randomise(g, ae.encoder.bias, ae.b_dec)
    with torch.no_grad():  # the trainer sets the inference threshold once past threshold_start_step
        ae.threshold.fill_(0.05)
    # the paper's layout: resid_post_layer_{L}/trainer_{i}/{ae.pt, config.json}
    path = _fresh("dictionary_learning") / "resid_post_layer_3" / "trainer_0"
    path.mkdir(parents=True)
    buffer_config = {"d_submodule": D, "io": "out", "n_ctxs": 8, "ctx_len": 32, "refresh_batch_size": 4,
                     "out_batch_size": 16, "device": "cpu"}  # ActivationBuffer.config's fields
    with open(path / "config.json", "w") as f:  # as dictionary_learning.training.trainSAE writes it
        json.dump({"trainer": trainer.config, "buffer": buffer_config}, f, indent=4)
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, path / "ae.pt")  # as trainSAE saves the final SAE

    loaded = AutoEncoderTopK.from_pretrained(str(path / "ae.pt"))
    x = _batch(31)
    with torch.no_grad():
        x_hat, f = loaded(x, output_features=True)
    _write_expected(path, x, x_hat, f)


def write_readme() -> None:
    versions = {name: md.version(name) for name in ("eai-sparsify", "sae-lens", "dictionary-learning", "torch",
                                                    "safetensors")}
    lines = [
        "# Interop fixtures",
        "",
        "Tiny real SAE checkpoints (d=16, n=64, k=4) written by the peer libraries' own save code, generated by",
        "`scripts/make_interop_fixtures.py` (run it in a separate venv holding the peers; see its docstring).",
        "Each checkpoint directory has `expected.safetensors`: an input batch `x [8, 16]` and the library's own",
        "outputs on it, `x_hat [8, 16]` and the dense top-k code `f [8, 64]`.",
        "",
        "| directory | written by |",
        "|---|---|",
        "| `sparsify/layers.3/` | `SparseCoder.save_to_disk` (expansion_factor=4, num_latents=0) |",
        "| `saelens/topk/` | `TopKSAE.save_model` (v6 layout) |",
        "| `saelens/topk_rescaled/` | `TopKSAE.save_model` with `rescale_acts_by_decoder_norm=True`, "
        "`apply_b_dec_to_input=False`, non-unit decoder rows |",
        "| `saelens/legacy_pre6/` | weights by `TopKSAE.save_model`; `cfg.json` written by hand in the pre-6.0 "
        "layout (`activation_fn_str: topk`, `activation_fn_kwargs.k`), which this SAELens can read but no longer "
        "write; expected outputs from SAELens' own loading of it |",
        "| `dictionary_learning/resid_post_layer_3/trainer_0/` | `TopKTrainer(...).ae` state dict via `torch.save`, "
        "`config.json` = `{\"trainer\": trainer.config, \"buffer\": ...}` as `trainSAE` writes them "
        "(threshold buffer set to 0.05 as a trained SAE has it) |",
        "",
        "Versions used:",
        "",
        *[f"- {name} {version}" for name, version in versions.items()],
        f"- Python {sys.version.split()[0]}",
        "",
    ]
    (ROOT / "README.md").write_text("\n".join(lines))


def main() -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    make_sparsify()
    make_saelens()
    make_dictionary_learning()
    write_readme()
    for p in sorted(ROOT.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(ROOT)}  {p.stat().st_size} B")


if __name__ == "__main__":
    main()
