"""DiffusionGemma through transformers' native ``DiffusionGemmaForBlockDiffusion`` (transformers >= 5.11).

DiffusionGemma is a block-diffusion model: a *causal encoder* reads the prompt into a KV cache and a
*bidirectional canvas decoder* denoises a block of ``canvas_length`` tokens attending to that cache and to
the whole canvas. Its corruption is uniform noise (random tokens), so it has **no mask token**.

For this adapter the sequence being scored is the canvas: ``logits(input_ids)`` treats ``input_ids`` as
the canvas (position i scores canvas token i, no shift) and conditions on ``prompt_ids`` (default: one BOS
token per row). The hook point is resid_post of **decoder** block L (``model.model.decoder.layers[L]``).
"""
from __future__ import annotations

import torch

from .base import Adapter, from_pretrained_strict, load_tokenizer

__all__ = ["DiffusionGemmaAdapter", "load_diffusion_gemma"]


def _model_class():
    try:
        from transformers import DiffusionGemmaForBlockDiffusion
    except ImportError:
        import transformers

        raise ValueError(
            f"DiffusionGemma needs transformers >= 5.11 (DiffusionGemmaForBlockDiffusion); installed "
            f"transformers {transformers.__version__} does not provide it"
        ) from None
    return DiffusionGemmaForBlockDiffusion


class DiffusionGemmaAdapter(Adapter):
    """Adapter over ``DiffusionGemmaForBlockDiffusion``: canvas in, canvas logits out."""

    @property
    def blocks(self):
        return self.model.model.decoder.layers

    @property
    def text_config(self):
        return self.model.config.text_config

    def _prompt(self, input_ids: torch.Tensor, prompt_ids: torch.Tensor | None) -> torch.Tensor:
        if prompt_ids is None:
            bos = self.text_config.bos_token_id
            bos = 2 if bos is None else int(bos)
            return torch.full((input_ids.shape[0], 1), bos, dtype=input_ids.dtype, device=input_ids.device)
        if prompt_ids.dim() != 2 or prompt_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"prompt_ids must be [batch, prompt_len] with batch {input_ids.shape[0]}, got {tuple(prompt_ids.shape)}"
            )
        return prompt_ids

    def _gemma_kwargs(self, input_ids, attention_mask, prompt_ids, prompt_attention_mask) -> dict:
        kw = self._forward_kwargs(input_ids, attention_mask)  # validates shapes / dtypes
        kw.pop("use_cache", None)
        canvas = kw.pop("input_ids")
        prompt = self._prompt(canvas, prompt_ids)
        out = {"input_ids": prompt, "decoder_input_ids": canvas}
        if prompt_attention_mask is not None:
            out["attention_mask"] = prompt_attention_mask
        if attention_mask is not None:
            pm = prompt_attention_mask if prompt_attention_mask is not None else torch.ones_like(prompt)
            out["decoder_attention_mask"] = torch.cat([pm.to(attention_mask.dtype), attention_mask], dim=1)
        return out

    def raw_logits(self, input_ids, attention_mask=None, *, prompt_ids=None, prompt_attention_mask=None):
        kw = self._gemma_kwargs(input_ids, attention_mask, prompt_ids, prompt_attention_mask)
        return self.model(**kw).logits

    def logits(self, input_ids, attention_mask=None, *, prompt_ids=None, prompt_attention_mask=None):
        """``[B, T, V]`` canvas logits (position i scores canvas token i), conditioned on ``prompt_ids``."""
        return self.raw_logits(input_ids, attention_mask, prompt_ids=prompt_ids,
                               prompt_attention_mask=prompt_attention_mask)

    def _run_trunk(self, input_ids, attention_mask, prompt_ids=None, prompt_attention_mask=None):
        self.model.model(**self._gemma_kwargs(input_ids, attention_mask, prompt_ids, prompt_attention_mask))


def load_diffusion_gemma(path: str, cfg: dict, *, device=None, dtype=None) -> DiffusionGemmaAdapter:
    cls = _model_class()
    kw = {} if dtype is None else {"dtype": dtype}
    model = from_pretrained_strict(cls, path, **kw)
    model = model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()
    return DiffusionGemmaAdapter(model, load_tokenizer(path), family="diffusion_gemma", mask_token_id=None,
                                 is_diffusion=True, logit_shift=0, source=path, noise="uniform")
