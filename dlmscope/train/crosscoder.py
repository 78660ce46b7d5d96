"""Training a :class:`~dlmscope.sae.crosscoder.Crosscoder` on paired activations x [B, S, d].

A dedicated loop, not :class:`dlmscope.train.trainer.Trainer` (whose stream is [B, d] and whose SAEs have one
decoder). The recipe follows the Top-K trainer's where it applies: ``b_dec`` starts at each source's geometric
median of the first batch, AuxK revives dead latents, the decoder takes ``ops.decoder_norm_step`` (here on the
[n, S·d] concatenated view, which keeps each latent's concatenated decoder row at unit norm).
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable

import torch
from torch import Tensor

from dlmscope import ops
from dlmscope.sae.crosscoder import Crosscoder
from dlmscope.util.checks import require_int
from .geometric_median import geometric_median
from .step import fired_latents

__all__ = ["fit_crosscoder"]


def fit_crosscoder(cc: Crosscoder, stream: Iterable[Tensor], *, steps: int, lr: float, warmup_steps: int = 0,
                   auxk_alpha: float = 1 / 32, k_aux: int | None = None, dead_tokens: int = 10_000_000,
                   betas: tuple[float, float] = (0.9, 0.999), init_b_dec: bool = True, seed: int = 0) -> list[dict]:
    """Train ``cc`` in place on ``steps`` batches of ``stream`` (paired activations x [B, S, d]: the same tokens
    through each source, in cc's dtype and device); returns one dict per step (``loss``, ``mse`` [S] list, ``auxk``,
    ``dead``). No input normalisation is applied, so scale the sources comparably beforehand.
    ``init_b_dec``: set ``b_dec[s]`` to the geometric median of source s in the first batch before the first step
    (as the Top-K trainer does; from a zero ``b_dec`` the activations' mean dominates every pre-activation and most
    latents never fire).

    Loss = Σ_s mean_b |x_s,b − x̂_s,b|² + auxk_alpha · AuxK. AuxK is the Top-K recipe's (Gao et al. 2024): the
    top ``k_aux`` (default ``min(S·d // 2, n)``) relu'd pre-activations among latents that have not fired for
    ``dead_tokens`` tokens (selected in the code's own encoder call, :meth:`Crosscoder.encode_with_aux`, zero-padded
    where fewer are dead) reconstruct the detached residual, normalised by the residual's energy about its batch
    mean (Σ over sources); zero while no latent is dead. Updates: ``torch.optim.Adam`` on W_enc, b_enc, b_dec
    with a linear warmup over ``warmup_steps``; the decoder takes ``ops.decoder_norm_step`` on its [n, S·d]
    concatenated view (gradient made orthogonal to each unit concatenated row, Adam, rows renormalised), which
    keeps the decoder convention of the module doc. ``seed`` seeds torch's RNG for the loop (restored after)."""
    steps = require_int("steps", steps, 0)
    warmup_steps = require_int("warmup_steps", warmup_steps, 0)
    dead_tokens = require_int("dead_tokens", dead_tokens, 1)
    if not (float(lr) > 0 and math.isfinite(float(lr))):
        raise ValueError(f"lr must be > 0 and finite, got {lr}")
    k_aux = min(cc.S * cc.d // 2, cc.n) if k_aux is None else require_int("k_aux", k_aux, 1)
    cc.train()
    cc.normalize_decoder()
    opt = torch.optim.Adam([cc.W_enc, cc.b_enc, cc.b_dec], lr=lr, betas=betas)
    n, Sd = cc.n, cc.S * cc.d
    exp_avg = cc.W_dec.new_zeros(n, Sd)
    exp_avg_sq = cc.W_dec.new_zeros(n, Sd)
    since = torch.zeros(n, dtype=torch.int64, device=cc.W_dec.device)  # tokens since each latent last fired
    history: list[dict] = []
    batches = iter(stream)
    if init_b_dec and steps:
        first = next(batches)
        cc.check_input(first)
        with torch.no_grad():
            for s in range(cc.S):
                cc.b_dec[s].copy_(geometric_median(first[:, s].float()).to(cc.b_dec))
        batches = itertools.chain([first], batches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(1, steps + 1):
            x = next(batches)
            cc.check_input(x)
            scale = min(1.0, step / warmup_steps) if warmup_steps else 1.0
            for group in opt.param_groups:
                group["lr"] = lr * scale
            dead = since >= dead_tokens
            if auxk_alpha > 0:  # the dead latents' selection comes out of the code's own encoder call
                values, indices, aux_values, aux_indices = cc.encode_with_aux(x, dead, k_aux)
            else:
                values, indices = cc.encode(x)
            x_hat = cc.decode(values, indices)
            residual = x - x_hat
            mse = residual.pow(2).sum(-1).mean(0)  # [S]
            loss = mse.sum()
            aux = loss.new_zeros(())
            if auxk_alpha > 0:
                e_det = residual.detach()
                W_dec, zero = cc.W_dec.to(x.dtype), x.new_zeros(cc.d)  # decoded without b_dec
                a_hat = torch.stack([ops.sparse_decode(aux_values, aux_indices, W_dec[s], zero, backend=cc.backend)
                                     for s in range(cc.S)], dim=1)
                aux_sum = (e_det - a_hat).pow(2).sum()
                denom = (e_det - e_det.mean(0)).pow(2).sum()
                # zero while nothing is dead (the padded selection is all zeros then); a tensor test, no sync
                aux = torch.where(dead.any() & (denom > 0), aux_sum / denom.clamp_min(1e-30), torch.zeros_like(aux_sum))
                loss = loss + auxk_alpha * aux
            opt.zero_grad(set_to_none=True)
            cc.W_dec.grad = None
            loss.backward()
            opt.step()
            grad = cc.W_dec.grad.transpose(0, 1).reshape(n, Sd)
            W_cat = cc.W_dec.detach().transpose(0, 1).reshape(n, Sd).contiguous()
            ops.decoder_norm_step(W_cat, grad, exp_avg, exp_avg_sq, step, lr * scale, betas, backend=cc.backend)
            with torch.no_grad():
                cc.W_dec.copy_(W_cat.reshape(n, cc.S, cc.d).transpose(0, 1))
                since = torch.where(fired_latents(values, indices, n), torch.zeros_like(since), since + x.shape[0])
            # one host sync per step for the history row
            row = torch.cat([loss.detach().reshape(1), mse.detach(), aux.detach().reshape(1),
                             dead.sum().reshape(1).to(mse.dtype)]).tolist()
            history.append({"loss": row[0], "mse": row[1:-2], "auxk": row[-2], "dead": int(row[-1])})
    cc.W_dec.grad = None
    return history
