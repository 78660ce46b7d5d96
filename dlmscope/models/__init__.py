"""Model adapters: load LLaDA / Dream / DiffusionGemma / AR baselines natively and expose layer access.

``load(path_or_id)`` reads ``config.json``, detects the checkpoint family and returns an
:class:`~dlmscope.models.base.Adapter`:

=================  ===========================================  ==========  ===========
family             native class                                 attention   logit shift
=================  ===========================================  ==========  ===========
LLaDA              ``LlamaForCausalLM`` (key rename)            full        0
Dream              ``Qwen2ForCausalLM`` (identical keys)        full        1
DiffusionGemma     ``DiffusionGemmaForBlockDiffusion``          canvas      0
Llama / Qwen2 (AR) ``AutoModelForCausalLM``                     causal      0 (next token)
=================  ===========================================  ==========  ===========

No ``trust_remote_code`` anywhere. Beside the adapters: :mod:`.hooks` (read, replace or add to a block's output),
:mod:`.sampling` and :mod:`.sampler_rules` (LLaDA's and Dream's samplers, AR generation).
"""
from __future__ import annotations

import os
import re

import torch

from .ar import AR_MODEL_TYPES, load_ar
from .base import Adapter, read_config
from .dream import is_dream_config, load_dream, save_dream_checkpoint
from .gemma import load_diffusion_gemma
from .llada import is_llada_config, load_llada, save_llada_checkpoint

__all__ = ["Adapter", "load", "detect_family", "save_llada_checkpoint", "save_dream_checkpoint"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def detect_family(cfg: dict, *, source: str = "") -> str:
    """``"llada" | "dream" | "diffusion_gemma" | "ar"`` from a config.json dict (ValueError if unknown)."""
    model_type = cfg.get("model_type")
    if is_llada_config(cfg):
        return "llada"
    if is_dream_config(cfg):
        return "dream"
    if str(model_type).lower() in ("diffusion_gemma", "diffusiongemma"):
        return "diffusion_gemma"
    if str(model_type).lower() in AR_MODEL_TYPES:
        return "ar"
    raise ValueError(
        f"{source or 'checkpoint'}: unsupported model_type {model_type!r} (architectures "
        f"{cfg.get('architectures')!r}); supported: LLaDA ('llada'), Dream ('Dream'), DiffusionGemma "
        f"('diffusion_gemma'), AR baselines {sorted(AR_MODEL_TYPES)}"
    )


def _resolve(path_or_id: str | os.PathLike) -> str:
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a file; expected a checkpoint directory (config.json + safetensors)")
    if path.startswith(("/", ".", "~")) or not _HUB_ID.match(path) or os.path.isdir(path.split("/", 1)[0]):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
        try:  # the local hub cache first: no network needed for models fetched before
            return snapshot_download(path, allow_patterns=patterns, local_files_only=True)
        except Exception:
            return snapshot_download(path, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, gated, ...
        raise FileNotFoundError(
            f"model {path!r} is neither a local directory nor fetchable from the Hugging Face hub "
            f"({type(e).__name__}: {e})"
        ) from None


def load(
    path_or_id: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Adapter:
    """Load a checkpoint directory (or hub id) into an :class:`Adapter`.

    ``device`` defaults to CPU; ``dtype=None`` keeps the checkpoint's stored floating dtype.
    Raises FileNotFoundError for a missing path and ValueError for an unsupported format.
    """
    path = _resolve(path_or_id)
    cfg = read_config(path)
    family = detect_family(cfg, source=path)
    if family == "llada":
        adapter = load_llada(path, cfg, device=device, dtype=dtype)
    elif family == "dream":
        adapter = load_dream(path, cfg, device=device, dtype=dtype)
    elif family == "diffusion_gemma":
        adapter = load_diffusion_gemma(path, cfg, device=device, dtype=dtype)
    else:
        adapter = load_ar(path, cfg, device=device, dtype=dtype)
    return adapter
