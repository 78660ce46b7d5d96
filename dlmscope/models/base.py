"""The model adapter: one object that knows how to run a (diffusion or autoregressive) LM for SAE work.

An :class:`Adapter` wraps a native transformers model and exposes what harvesting, splicing and
evaluation need, independent of the checkpoint family:

* ``.model`` / ``.tokenizer`` / ``.config``
* ``.blocks`` — the decoder-layer ``nn.ModuleList``; ``.num_layers``
* ``.hook_module(L)`` — the module whose *output* is the hook point "resid_post of block L"
  (the residual stream right after ``layers[L]``, before any final norm). In transformers 5.24's
  ``output_hidden_states`` convention this is ``hidden_states[L + 1]`` for every block but the last;
  ``hidden_states[-1]`` is the *final-normed* output, i.e. ``norm(resid_post of the last block)``.
  :mod:`dlmscope.models.hooks` reads and edits the hidden state at this hook point.
* ``.mask_token_id`` (``None`` for AR models; :meth:`require_mask_token` raises for them)
* ``.is_diffusion`` and ``.logit_shift`` (1 for Dream: its raw logits at i score token i+1)
* ``.logits(input_ids, attention_mask)`` — aligned so that position i scores token i for every family
* ``.forward_until(input_ids, layers)`` — resid_post of the requested blocks, running the model only up
  to the deepest one (later blocks, the final norm and the LM head are never executed).

This module knows nothing of SAEs (see docs/design.md, "Layers").
"""
from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dlmscope.util import atomic
from .hooks import capture

__all__ = ["Adapter", "read_config", "read_state_dict", "build_from_state_dict", "load_tokenizer", "resolve_mask_token_id"]


class _StopForward(Exception):
    """Raised from a forward hook to end the forward pass after the deepest requested block."""


class Adapter:
    """A loaded language model plus the facts SAE tooling needs about it.

    Parameters
    ----------
    model: the native transformers model (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...), in eval mode.
    tokenizer: a tokenizer loaded from the checkpoint directory, or ``None`` if it ships none.
    family: ``"llada" | "dream" | "llama" | "qwen2" | "diffusion_gemma" | ...`` (informational).
    mask_token_id: the ``[MASK]`` id of a masked diffusion LM; ``None`` for AR models and uniform-noise DLMs.
    is_diffusion: whether the model is a (bidirectional, masked) diffusion LM.
    logit_shift: 0 if raw logits at position i score token i (LLaDA, AR models as used here for
        per-position scoring — see :meth:`logits`), 1 if they score token i+1 (Dream).
    source: the path or hub id the model came from (used in error messages).
    noise: ``"mask"`` (default for diffusion), ``"uniform"`` or ``"none"`` (default for AR).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None,
        *,
        family: str,
        mask_token_id: int | None,
        is_diffusion: bool,
        logit_shift: int,
        source: str,
        noise: str | None = None,
    ) -> None:
        if logit_shift not in (0, 1):
            raise ValueError(f"logit_shift must be 0 or 1, got {logit_shift!r}")
        noise = noise or ("mask" if is_diffusion else "none")
        if noise not in ("mask", "uniform", "none") or (noise == "none") == bool(is_diffusion):
            raise ValueError(f"{source}: inconsistent noise={noise!r} for is_diffusion={is_diffusion}")
        if noise == "mask" and mask_token_id is None:
            raise ValueError(f"{source}: a masked diffusion LM needs a mask_token_id")
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self._mask_token_id = None if mask_token_id is None else int(mask_token_id)
        self.is_diffusion = bool(is_diffusion)
        self.logit_shift = int(logit_shift)
        self.source = str(source)
        #: corruption process: "mask" (absorbing [MASK], LLaDA/Dream), "uniform" (random tokens,
        #: DiffusionGemma's canvas) or "none" (AR models).
        self.noise = noise

    # ------------------------------------------------------------------ facts
    @property
    def config(self):
        return self.model.config

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers, in order; ``blocks[L]``'s output is resid_post of block L."""
        return self.model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def mask_token_id(self) -> int | None:
        """The mask token id of a diffusion LM; ``None`` for an autoregressive model."""
        return self._mask_token_id

    def require_mask_token(self) -> int:
        """The mask token id, or a ValueError explaining that this model has none (AR models)."""
        if self._mask_token_id is None and self.is_diffusion:
            raise ValueError(
                f"model {self.source!r} ({self.family}) is a uniform-noise diffusion LM without a mask token; "
                "mask-based policies need an absorbing-mask DLM (LLaDA, Dream)"
            )
        if self._mask_token_id is None:
            raise ValueError(
                f"model {self.source!r} ({self.family}) is autoregressive and has no mask token; "
                "mask-based policies and diffusion metrics need a diffusion LM (LLaDA, Dream, DiffusionGemma)"
            )
        return self._mask_token_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(family={self.family!r}, source={self.source!r}, num_layers={self.num_layers}, "
            f"d_model={self.d_model}, is_diffusion={self.is_diffusion}, mask_token_id={self._mask_token_id}, "
            f"logit_shift={self.logit_shift})"
        )

    # ----------------------------------------------------------------- layers
    def check_layer(self, layer: Any) -> int:
        """``layer`` as an int in ``[0, num_layers)``, or a ValueError naming the valid range."""
        n = self.num_layers
        try:
            if isinstance(layer, bool):
                raise TypeError
            layer = operator.index(layer)
        except TypeError:
            raise ValueError(f"layer must be an integer in [0, {n - 1}] for {self.source!r}, got {layer!r}") from None
        if not 0 <= layer < n:
            raise ValueError(
                f"layer {layer} out of range for {self.source!r}: this model has {n} blocks, "
                f"valid layers are 0..{n - 1}"
            )
        return layer

    def check_layers(self, layers: int | Iterable[int]) -> list[int]:
        """Validated, de-duplicated, sorted layer indices (a single int is accepted)."""
        if isinstance(layers, torch.Tensor):
            layers = layers.reshape(-1).tolist()
        elif hasattr(layers, "__index__") or isinstance(layers, (str, bytes)):
            layers = [layers]
        try:
            layers = list(layers)
        except TypeError:  # None, a float, ...: not a layer index and not an iterable of them
            raise ValueError(
                f"layers must be an int or an iterable of ints in [0, {self.num_layers - 1}] for {self.source!r}, "
                f"got {layers!r}"
            ) from None
        if not layers:
            raise ValueError("no layers requested")
        return sorted({self.check_layer(layer) for layer in layers})

    def hook_module(self, layer: int) -> nn.Module:
        """The module whose forward output is resid_post of block ``layer`` (``blocks[layer]``)."""
        return self.blocks[self.check_layer(layer)]

    # ---------------------------------------------------------------- forward
    def _forward_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a [batch, seq] integer tensor, got "
                f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        kw = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        return kw

    def raw_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits exactly as it outputs them (no alignment)."""
        return self.model(**self._forward_kwargs(input_ids, attention_mask)).logits

    def align_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Apply the family's logit shift to raw ``[B, T, V]`` logits so that position i scores token i."""
        if self.logit_shift == 0:
            return raw
        # Dream: raw[:, i] predicts token i+1; position 0 has no predictor, reuse raw[:, 0] (as Dream's sampler does).
        return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, V]`` logits aligned so that position i scores token i.

        For diffusion LMs that is the masked-token prediction at i. For AR models the raw logits at i
        score token i+1 (next-token prediction); they are returned unchanged and ``logit_shift`` is 0:
        AR evaluation compares ``logits[:, :-1]`` with ``input_ids[:, 1:]`` as usual.
        """
        return self.align_logits(self.raw_logits(input_ids, attention_mask))

    def forward_until(
        self,
        input_ids: torch.Tensor,
        layers: int | Iterable[int],
        attention_mask: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> dict[int, torch.Tensor]:
        """resid_post ``[B, T, d]`` of each requested block, stopping after the deepest one.

        Blocks after ``max(layers)``, the final norm and the LM head are not run. Gradient mode is the
        caller's (wrap in ``torch.no_grad()`` for harvesting). ``model_kwargs`` are family-specific inputs
        (DiffusionGemma: ``prompt_ids``, ``prompt_attention_mask``).
        """
        wanted = self.check_layers(layers)
        deepest = wanted[-1]
        captured: dict[int, torch.Tensor] = {}

        def keep(idx: int):
            def fn(hidden: torch.Tensor) -> None:
                captured[idx] = hidden
                if idx == deepest:
                    raise _StopForward
            return fn

        with contextlib.ExitStack() as hooks:
            for idx in wanted:
                hooks.enter_context(capture(self.blocks[idx], keep(idx)))
            try:
                self._run_trunk(input_ids, attention_mask, **model_kwargs)
            except _StopForward:
                pass
        missing = [idx for idx in wanted if idx not in captured]
        if missing:  # pragma: no cover - would mean the model skipped blocks
            raise RuntimeError(f"blocks {missing} of {self.source!r} were not executed")
        return {idx: captured[idx] for idx in wanted}

    def _run_trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        # The base model (no LM head): the hooks stop it early anyway.
        self.model.model(**self._forward_kwargs(input_ids, attention_mask))


# ------------------------------------------------------------------------------------------ loading helpers
def _index_shards(index: str) -> list[str]:
    """The shard files ``model.safetensors.index.json`` names in its ``weight_map``: plain file names inside its
    folder (a name with a folder part, ``..`` or an absolute path would read outside it), else ``ValueError``."""
    data = atomic.read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a JSON object with a 'weight_map' of tensor name -> shard file name")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        plain = shard not in ("", ".", "..") and "\0" not in shard and os.path.basename(shard) == shard
        if not plain or (os.altsep and os.altsep in shard):
            raise ValueError(f"{index}: weight_map names the shard {shard!r}; shards must be plain file names in "
                             "the checkpoint folder (no folders, '..' or absolute paths)")
    return shards


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json: not a model checkpoint directory")
    cfg = atomic.read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    return cfg


def from_pretrained_strict(cls, path: str, **kwargs):
    """``cls.from_pretrained(path)``, but a checkpoint with missing or wrong-shape weights is a ValueError
    naming the keys (transformers would silently random-initialise them)."""
    from safetensors import SafetensorError

    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except SafetensorError as e:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        raise ValueError(f"{path}: unreadable safetensors file among {files} ({e})") from None
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(k[0]) if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        unexpected = sorted(info.get("unexpected_keys", ()))
        raise ValueError(
            f"{path}: checkpoint does not match {type(model).__name__}: missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, wrong-shape keys {mismatched[:8]}, unexpected keys "
            f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory (single file or sharded with an index)."""
    from safetensors.torch import load_file as _load_file

    def load_file(file: str) -> dict[str, torch.Tensor]:
        try:
            return _load_file(file)
        except FileNotFoundError:
            raise
        except Exception as e:  # SafetensorError / OSError: truncated or not a safetensors file
            raise ValueError(f"{file}: unreadable safetensors file ({type(e).__name__}: {e})") from None

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        sd: dict[str, torch.Tensor] = {}
        for shard in _index_shards(index):
            sd.update(load_file(os.path.join(path, shard)))
        return sd
    others = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    if len(others) == 1:
        return load_file(os.path.join(path, others[0]))
    raise FileNotFoundError(
        f"{path!r}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)"
    )


def build_from_state_dict(
    model_cls,
    config,
    state_dict: dict[str, torch.Tensor],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    source: str = "",
) -> nn.Module:
    """Instantiate ``model_cls(config)`` without random init and load ``state_dict`` strictly.

    ``dtype=None`` keeps the checkpoint's floating dtype. Tied output embeddings may be absent.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        float_dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
        dtype = float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32
    with torch.device("meta"):
        model = model_cls(config)
    expected = set(model.state_dict().keys())
    got = set(state_dict.keys())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = sorted(expected - got - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(got - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint does not match {model_cls.__name__}: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for name, ref in model.state_dict().items():
        if name in state_dict and tuple(state_dict[name].shape) != tuple(ref.shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(state_dict[name].shape)}, expected {tuple(ref.shape)}"
            )
    # assign=True adopts the loaded tensors (no second full-size allocation for large checkpoints)
    cast = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        for k, v in state_dict.items()
    }
    model.load_state_dict(cast, strict=False, assign=True)
    if tied:
        model.tie_weights()
    _rebuild_rotary(model, config, device)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"{source}: tensors left uninitialised after loading: {still_meta[:8]}")
    model.eval()
    return model


def _rebuild_rotary(model: nn.Module, config, device: torch.device) -> None:
    """Recompute non-persistent rotary buffers (they were left uninitialised by the meta-device build)."""
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            with torch.device("cpu"):
                fresh = type(module)(config=config)
            fresh = fresh.to(device)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, fresh)


def load_tokenizer(path: str):
    """The tokenizer shipped in ``path`` (AutoTokenizer, no remote code), or ``None`` if there is none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    # both read config.json, whose model_type ("llada", "dream") transformers does not know: it would warn
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            # trust_remote_code=False: LLaDA/Dream configs carry an auto_map; never prompt, never run hub code
            return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except Exception:
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                return PreTrainedTokenizerFast.from_pretrained(path)
            raise
    finally:
        hf_logging.set_verbosity(level)


def resolve_mask_token_id(cfg: dict, tokenizer, *, vocab_size: int, default: int | None, family: str, source: str) -> int:
    """The mask id of a masked DLM: config.json's ``mask_token_id``, else the tokenizer's mask token, else the
    family's published default if the vocabulary holds it. A tokenizer mask token that disagrees with the
    config is an error (it would silently corrupt every masked forward)."""
    cfg_id = cfg.get("mask_token_id")
    tok_id = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    if cfg_id is not None and tok_id is not None and int(cfg_id) != int(tok_id):
        raise ValueError(
            f"{source}: config.json mask_token_id {cfg_id} disagrees with the tokenizer's mask token id {tok_id}"
        )
    mask_id = cfg_id if cfg_id is not None else tok_id
    if mask_id is None and default is not None and vocab_size > default:
        mask_id = default
    if mask_id is None:
        raise ValueError(f"{source}: {family} config has no mask_token_id and the tokenizer defines no mask token")
    if not 0 <= int(mask_id) < vocab_size:
        raise ValueError(f"{source}: mask_token_id {mask_id} outside the vocabulary [0, {vocab_size})")
    return int(mask_id)
