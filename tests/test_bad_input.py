"""Bad input → clear errors, through the entry points a user touches (API and CLI): model loading, layers,
mask policies, SAE width.

Every case checks the exception type *and* a message fragment naming the problem. Models: the embedded
world's LLaDA-format DLM and its Llama AR twin, tiny checkpoints written to tmp_path, and a tiny
DiffusionGemma (uniform noise, no mask token).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmscope import cli, models
from dlmscope.data.activations import ActivationStream, harvest
from dlmscope.models import llada as llada_mod
from dlmscope.sae.topk import TopKSAE
from dlmscope.analysis.splice import ar_delta_loss, dlm_delta_loss, splice
from dlmscope.sae.metrics import evaluate_sae
from dlmscope.world import ASSETS_DIR
from tests.helpers.tiny_checkpoints import dream_config, llada_config, llada_tensors, write_dir

MODELS_DIR = os.path.join(ASSETS_DIR, "models")
DLM_DIR, AR_DIR = os.path.join(MODELS_DIR, "dlm"), os.path.join(MODELS_DIR, "ar")
with open(os.path.join(DLM_DIR, "config.json")) as _f:
    _DLM_CONFIG = json.load(_f)
N_LAYERS, D_MODEL = _DLM_CONFIG["n_layers"], _DLM_CONFIG["d_model"]  # the embedded world models
RANGE = rf"0\.\.{N_LAYERS - 1}"
VALID_POLICIES = "valid policies: mask, unmask, all, clean"
POLICY_TYPOS = ["Mask", "masked", "unmasked", "", "MASK ", None, 1]
BAD_LAYERS = [N_LAYERS, -1, 100]
NON_INT_LAYERS = [1.5, "2", True, None]


@pytest.fixture(scope="module")
def dlm():
    return models.load(DLM_DIR)


@pytest.fixture(scope="module")
def ar():
    return models.load(AR_DIR)


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return TopKSAE(D_MODEL, 64, 4)


def _ids(seed=0, batch=2, seq=12, vocab=408):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (batch, seq), generator=g)


def _layer_error(bad) -> str:
    """The fragment expected for a bad layer: the valid range for ints, 'integer' for everything else."""
    if isinstance(bad, int) and not isinstance(bad, bool):
        return rf"layer {bad} out of range.*valid layers are {RANGE}"
    return r"must be an (int|integer)"


# ----------------------------------------------------------------------------------------- loading
def test_unknown_hub_id_fails_fast_offline(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the parsed constant as well
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"'nobody-xyz/not-a-model' is neither a local directory nor "
                                                r"fetchable from the Hugging Face hub"):
        models.load("nobody-xyz/not-a-model")
    assert time.monotonic() - start < 10
    for not_an_id in ("not a model", "a/b/c", "./nope/model"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            models.load(not_an_id)


def test_file_instead_of_directory():
    with pytest.raises(ValueError, match="is a file; expected a checkpoint directory"):
        models.load(os.path.join(DLM_DIR, "config.json"))


def _copy_model(src: str, dst, **config_over) -> str:
    shutil.copytree(src, dst)
    if config_over:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_over)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("model_type, architectures", [("gpt2", ["GPT2LMHeadModel"]), ("t5", None),
                                                        (None, None)])
def test_unknown_model_type(tmp_path, model_type, architectures):
    d = _copy_model(DLM_DIR, tmp_path / "m", model_type=model_type, architectures=architectures)
    with pytest.raises(ValueError, match=rf"unsupported model_type {model_type!r}.*supported: LLaDA") as e:
        models.load(d)
    assert str(d) in str(e.value)


@pytest.mark.parametrize("text, fragment", [("{not json", "invalid JSON"), ("", "invalid JSON"),
                                            ("[1, 2]", "expected a JSON object")])
def test_config_json_not_a_json_object(tmp_path, text, fragment):
    d = _copy_model(DLM_DIR, tmp_path / "m")
    (d / "config.json").write_text(text)
    with pytest.raises(ValueError, match=fragment) as e:
        models.load(d)
    assert "config.json" in str(e.value)


def _world_tensors(name: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(MODELS_DIR, name, "model.safetensors"))


def _with_weights(tmp_path, config_of: str, tensors: dict[str, torch.Tensor], **config_over):
    d = _copy_model(os.path.join(MODELS_DIR, config_of), tmp_path / "m", **config_over)
    (d / "model.safetensors").unlink()
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("name", ["dlm", "ar"])
def test_truncated_safetensors_file(tmp_path, name):
    d = _copy_model(os.path.join(MODELS_DIR, name), tmp_path / "m")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="unreadable safetensors file") as e:
        models.load(d)
    assert "model.safetensors" in str(e.value)
    rc = cli.main(["eval", "--model", str(d), "--sae", "unused", "--layer", "0"])
    assert rc == 2


def test_llada_config_with_llama_weights(tmp_path):
    d = _with_weights(tmp_path, "dlm", _world_tensors("ar"))
    with pytest.raises(ValueError, match=r"unknown LLaDA parameter '(lm_head|model\.)") as e:
        models.load(d)
    assert str(d) in str(e.value)


def test_llada_weights_missing_a_block(tmp_path):
    sd = {k: v for k, v in _world_tensors("dlm").items() if ".blocks.3." not in k}
    with pytest.raises(ValueError, match=r"checkpoint does not match LlamaForCausalLM: missing keys "
                                         r"\['model\.layers\.3\."):
        models.load(_with_weights(tmp_path, "dlm", sd))


def test_llada_config_deeper_than_its_weights(tmp_path):
    with pytest.raises(ValueError, match=rf"missing keys \['model\.layers\.{N_LAYERS}\."):
        models.load(_with_weights(tmp_path, "dlm", _world_tensors("dlm"), n_layers=N_LAYERS + 1))


def test_llada_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        models.load(_with_weights(tmp_path, "dlm", _world_tensors("dlm"), mlp_hidden_size=256))


def test_llama_config_with_llada_weights(tmp_path):
    with pytest.raises(ValueError, match=r"does not match LlamaForCausalLM: missing keys \[.*unexpected keys "
                                         r"\['model\.transformer\."):
        models.load(_with_weights(tmp_path, "ar", _world_tensors("dlm")))


def test_llama_weights_missing_a_layer(tmp_path):
    sd = {k: v for k, v in _world_tensors("ar").items() if ".layers.3." not in k}
    with pytest.raises(ValueError, match=r"missing keys \['model\.layers\.3\."):
        models.load(_with_weights(tmp_path, "ar", sd))


def test_llama_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"wrong-shape keys \['model\.layers\.0\.mlp\."):
        models.load(_with_weights(tmp_path, "ar", _world_tensors("ar"), intermediate_size=256))


def test_dream_config_with_biasless_weights(tmp_path):
    sd = llada_mod.llada_state_dict_to_llama(llada_tensors())  # Qwen2 keys, but no q/k/v biases
    with pytest.raises(ValueError, match=r"does not match Qwen2ForCausalLM: missing keys \['model\.layers\.0\."
                                         r"self_attn\.k_proj\.bias'"):
        models.load(write_dir(tmp_path / "dream", dream_config(), sd))


def test_llada_checkpoint_without_any_weights_of_its_own(tmp_path):
    with pytest.raises(ValueError, match="unknown LLaDA parameter 'foo'"):
        models.load(write_dir(tmp_path / "foo", llada_config(), {"foo": torch.zeros(2)}))


# -------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("bad", BAD_LAYERS + NON_INT_LAYERS)
def test_bad_layer_through_the_api(dlm, ar, sae, bad):
    ids = _ids()
    match = _layer_error(bad)
    with pytest.raises(ValueError, match=match):
        with splice(dlm, bad, sae):
            pass
    with pytest.raises(ValueError, match=match):
        dlm_delta_loss(dlm, sae, bad, ids)
    with pytest.raises(ValueError, match=match):
        ar_delta_loss(ar, sae, bad, ids)
    with pytest.raises(ValueError, match=match):
        ActivationStream(dlm, [ids], bad, "mask")
    with pytest.raises(ValueError, match=match):
        ActivationStream(dlm, [ids], [0, bad], "mask")
    with pytest.raises(ValueError, match=match):
        harvest(ar, ids, [bad], "clean")


def test_layers_not_a_layer_or_a_list(dlm):
    for bad in (None, 1.5, object()):
        with pytest.raises(ValueError, match=rf"layers must be an int or an iterable of ints in \[0, {N_LAYERS - 1}\]"):
            ActivationStream(dlm, [_ids()], bad, "mask")
    with pytest.raises(ValueError, match="no layers requested"):
        ActivationStream(dlm, [_ids()], [], "mask")


@pytest.fixture(scope="module")
def saved_sae(tmp_path_factory):
    torch.manual_seed(1)
    return str(TopKSAE(D_MODEL, 64, 4).save(tmp_path_factory.mktemp("sae") / "sae"))


@pytest.mark.parametrize("bad", [str(N_LAYERS), "-1", "99"])
def test_bad_layer_through_the_cli(tmp_path, saved_sae, capsys, bad):
    rc = cli.main(["train", "--model", DLM_DIR, "--layers", "0", bad, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "dlmscope train: error" in err and f"layer {bad} out of range" in err
    assert f"valid layers are 0..{N_LAYERS - 1}" in err
    rc = cli.main(["eval", "--model", DLM_DIR, "--sae", saved_sae, "--layer", bad])
    err = capsys.readouterr().err
    assert rc == 2 and "dlmscope eval: error" in err and f"valid layers are 0..{N_LAYERS - 1}" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_non_integer_layer_through_the_cli(saved_sae, capsys, command):
    argv = (["train", "--model", DLM_DIR, "--layers", "two", "--out", "unused"] if command == "train" else
            ["eval", "--model", DLM_DIR, "--sae", saved_sae, "--layer", "1.5"])
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        cli.main(argv)
    assert e.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- policies
@pytest.mark.parametrize("typo", POLICY_TYPOS)
def test_policy_typo_through_the_api(dlm, typo):
    ids = _ids()
    with pytest.raises(ValueError, match=rf"unknown mask policy {typo!r}.*{VALID_POLICIES}"):
        harvest(dlm, ids, [0], typo)
    with pytest.raises(ValueError, match=rf"unknown mask policy {typo!r}.*{VALID_POLICIES}"):
        ActivationStream(dlm, [ids], [0], typo)


@pytest.mark.parametrize("typo, hint", [("Mask", "mask"), ("masked", "mask"), ("unmasked", "unmask"),
                                        ("Clean", "clean")])
def test_policy_typo_suggests_the_closest(dlm, typo, hint):
    with pytest.raises(ValueError, match=f"did you mean '{hint}'"):
        ActivationStream(dlm, [_ids()], [0], typo)


CLI_TEXT = ["--sentences", "40", "--seq-len", "16", "--lm-batch", "4", "--batch-size", "16"]


@pytest.mark.parametrize("typo", ["Mask", "masked", "unmasked", ""])
def test_policy_typo_through_the_cli(tmp_path, saved_sae, capsys, typo):
    rc = cli.main(["train", "--model", DLM_DIR, "--layers", "0", "--policy", typo, *CLI_TEXT,
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "dlmscope train: error" in err and f"unknown mask policy {typo!r}" in err
    assert VALID_POLICIES in err
    if True:  # eval too (an empty --policy is a typo, not "the model's default")
        rc = cli.main(["eval", "--model", DLM_DIR, "--sae", saved_sae, "--layer", "0", "--policy", typo, *CLI_TEXT])
        err = capsys.readouterr().err
        assert rc == 2 and "dlmscope eval: error" in err and VALID_POLICIES in err


# ------------------------------------------------------------------------------------ no mask token
@pytest.mark.parametrize("policy", ["mask", "unmask", "all"])
def test_ar_model_with_a_mask_policy(ar, policy):
    ids = _ids()
    fragment = re.escape(repr(AR_DIR)) + r".*autoregressive and has no mask token"
    with pytest.raises(ValueError, match=fragment):
        harvest(ar, ids, [0], policy)
    with pytest.raises(ValueError, match=fragment):
        ActivationStream(ar, [ids], [0], policy)


def test_delta_loss_on_the_wrong_kind_of_model(dlm, ar, sae):
    ids = _ids()
    with pytest.raises(ValueError, match="dlm_delta_loss needs a diffusion LM; use ar_delta_loss"):
        dlm_delta_loss(ar, sae, 0, ids)
    with pytest.raises(ValueError, match="ar_delta_loss is for autoregressive models; use dlm_delta_loss"):
        ar_delta_loss(dlm, sae, 0, ids)
    with pytest.raises(ValueError, match="autoregressive and has no mask token"):
        with splice(ar, 0, sae, positions="masked"):
            pass


@pytest.mark.parametrize("policy", ["mask", "unmask"])
def test_ar_model_with_a_mask_policy_through_the_cli(tmp_path, saved_sae, capsys, policy):
    rc = cli.main(["train", "--model", AR_DIR, "--layers", "0", "--policy", policy, *CLI_TEXT,
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "autoregressive and has no mask token" in err
    rc = cli.main(["eval", "--model", AR_DIR, "--sae", saved_sae, "--layer", "0", "--policy", policy, *CLI_TEXT])
    err = capsys.readouterr().err
    assert rc == 2 and "autoregressive and has no mask token" in err


def test_diffusion_gemma_has_no_mask_token(gemma):
    ids = _ids(vocab=gemma.vocab_size, seq=6)
    fragment = "uniform-noise diffusion LM without a mask token"
    for policy in ("mask", "unmask", "all"):
        with pytest.raises(ValueError, match=fragment):
            ActivationStream(gemma, [ids], [0], policy)
        with pytest.raises(ValueError, match=fragment):
            harvest(gemma, ids, [0], policy)
    small = TopKSAE(gemma.d_model, 16, 2)
    with pytest.raises(ValueError, match=fragment):
        dlm_delta_loss(gemma, small, 0, ids)
    with pytest.raises(ValueError, match=fragment):
        with splice(gemma, 0, small, positions="masked"):
            pass


# ----------------------------------------------------------------------------------- SAE / model size
def test_sae_of_the_wrong_width(dlm, ar):
    ids = _ids()
    wrong = TopKSAE(D_MODEL // 2, 32, 4)
    fragment = rf"SAE input size d={D_MODEL // 2} does not match the model's hidden size {D_MODEL}"
    with pytest.raises(ValueError, match=fragment):
        with splice(dlm, 1, wrong):
            pass
    with pytest.raises(ValueError, match=fragment):
        dlm_delta_loss(dlm, wrong, 1, ids)
    with pytest.raises(ValueError, match=fragment):
        ar_delta_loss(ar, wrong, 1, ids)
    stream = ActivationStream(dlm, [ids], [1], "clean", batch_size=8, buffer_tokens=16, drop_last=False)
    expects = rf"shape \[\d+, {D_MODEL}\] but this SAE expects \[\.\.\., d={D_MODEL // 2}\]"
    with pytest.raises(ValueError, match=expects):
        evaluate_sae(wrong, stream.for_layer(1))


def test_sae_of_the_wrong_width_through_the_cli(tmp_path, capsys):
    path = str(TopKSAE(D_MODEL // 2, 32, 4).save(tmp_path / "narrow"))
    rc = cli.main(["eval", "--model", DLM_DIR, "--sae", path, "--layer", "1", *CLI_TEXT])
    err = capsys.readouterr().err
    assert rc == 2 and "dlmscope eval: error" in err and f"d={D_MODEL // 2}" in err
