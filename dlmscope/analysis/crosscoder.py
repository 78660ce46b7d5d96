"""Model diffing with a two-source crosscoder (:class:`dlmscope.sae.crosscoder.Crosscoder`, S = 2).

- :func:`relative_decoder_norm`: ``ρ_i = ‖W_dec[1, i]‖ / (‖W_dec[0, i]‖ + ‖W_dec[1, i]‖)`` [n] (Lindsey et al.
  2024): 0 = used by source 0 only, 1 = by source 1 only, 0.5 = shared with equal norms; NaN for a zero decoder.
- :func:`latent_labels` / :func:`classify`: ρ <= low → exclusive to 0, ρ >= high → exclusive to 1, else shared.
- :func:`latent_scaling`: Latent Scaling (Minder et al. 2025, "Robustly identifying concepts introduced during
  chat fine-tuning using crosscoders"), which flags latents that only LOOK exclusive by decoder norm.
- The seed-to-seed null for "exclusive": :func:`exclusive_replication` (do one training seed's exclusive latents
  come back, with the same label, in another seed, beyond what labels assigned at random would give?). Not a null:
  swapping each token's two sources at random — a feature present in one source only still gives slot-exclusive
  latents (a pair of them) after the swap, so the swap keeps what it should remove.
- :func:`firing_counts` / :func:`specificity`: how much more often a latent fires on one text than another (e.g. the
  fine-tune's own Q&A text vs pre-training text), to check exclusive latents against what the fine-tune taught.

Latent Scaling, the exact definition used here. For latent j with direction ``d_j = W_dec[s*, j]`` (s* the source
it looks exclusive to: by default the one with the larger decoder norm) and held-out tokens t with code f_j(t)
(the crosscoder's own code, eval mode), for each source s a least-squares scalar

    β_s = argmin_β Σ_t ‖β f_j(t) d_j − y_s(t)‖² = Σ_t f_j(t) ⟨y_s(t), d_j⟩ / (‖d_j‖² Σ_t f_j(t)²)

(only tokens where j fires contribute), with two targets y_s:

- ``"error"`` (β^ε): ``y_s = x_s − x̂_s + f_j W_dec[s, j]``, source s's activation left unexplained by the OTHER
  latents (the reconstruction error with latent j's own term added back; for the source whose row of j is ~0
  this is just its error). For s* it holds j's own contribution, so β^ε_{s*} ≈ 1 for a working latent;
- ``"reconstruction"`` (β^r): ``y_s = x̂_s − b_dec[s]``, source s's centred reconstruction (latent j included;
  b_dec is removed so a constant offset does not leak into β), β^r_{s*} ≈ 1 likewise.

The ratio ``ν_s = β_s / β_{s*}`` (so ν_{s*} = 1). A truly exclusive latent has ν_other ≈ 0 on both targets; a
latent whose direction is still present in the other source's activations has a large ν^ε ("complete
shrinkage": the other source's error still holds it) or ν^r ("latent decoupling": other latents rebuild it).
Everything is plain torch over held-out activations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from scipy.stats import binom
from torch import Tensor

from dlmscope.sae.crosscoder import Crosscoder

__all__ = ["relative_decoder_norm", "latent_labels", "classify", "LatentScaling", "latent_scaling",
           "beta_least_squares", "firing_counts", "specificity", "source_partners",
           "exclusive_replication", "SHARED", "EXCLUSIVE_0", "EXCLUSIVE_1", "NO_DECODER"]

#: labels of :func:`latent_labels`
EXCLUSIVE_0, EXCLUSIVE_1, SHARED, NO_DECODER = 0, 1, 2, -1


def _require_two(cc: Crosscoder) -> None:
    if not isinstance(cc, Crosscoder):
        raise TypeError(f"expected a Crosscoder, got {type(cc).__name__}")
    if cc.S != 2:
        raise ValueError(f"this analysis compares two sources; the crosscoder has S={cc.S}")


def relative_decoder_norm(cc: Crosscoder) -> Tensor:
    """ρ [n] float: ‖W_dec[1, i]‖ / (‖W_dec[0, i]‖ + ‖W_dec[1, i]‖), in [0, 1]; NaN where both norms are 0."""
    _require_two(cc)
    norms = cc.W_dec.detach().norm(dim=2)  # [2, n]
    total = norms[0] + norms[1]
    return torch.where(total > 0, norms[1] / total.clamp_min(torch.finfo(total.dtype).tiny),
                       torch.full_like(total, float("nan")))


def latent_labels(rel: Tensor, low: float = 0.1, high: float = 0.9) -> Tensor:
    """labels [n] int64 of ρ [n]: EXCLUSIVE_0 (ρ <= low), EXCLUSIVE_1 (ρ >= high), SHARED (between), NO_DECODER
    (NaN). Requires 0 <= low < high <= 1."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    labels = torch.full(rel.shape, SHARED, dtype=torch.int64, device=rel.device)
    labels[rel <= low] = EXCLUSIVE_0
    labels[rel >= high] = EXCLUSIVE_1
    labels[torch.isnan(rel)] = NO_DECODER
    return labels


def classify(rel: Tensor, low: float = 0.1, high: float = 0.9, *, mask: Tensor | None = None) -> dict[str, int]:
    """Counts ``{"shared", "exclusive_0", "exclusive_1", "no_decoder"}`` of the latents of ρ [n] (see
    :func:`latent_labels`), over the latents where ``mask`` [n] bool is True (e.g. those that fire) if given."""
    labels = latent_labels(rel, low, high)
    if mask is not None:
        labels = labels[mask]
    return {name: int((labels == code).sum()) for name, code in
            (("shared", SHARED), ("exclusive_0", EXCLUSIVE_0), ("exclusive_1", EXCLUSIVE_1),
             ("no_decoder", NO_DECODER))}


def beta_least_squares(f: Tensor, y: Tensor, direction: Tensor) -> Tensor:
    """β [m]: the least-squares scalars of ``β f_j(t) d_j ≈ y_j(t)`` for m latents over T tokens:
    ``Σ_t f_j(t) ⟨y_j(t), d_j⟩ / (‖d_j‖² Σ_t f_j(t)²)``; NaN where j never fires or d_j = 0.

    f [T, m] activations, y [T, m, d] targets, direction [m, d]."""
    num = (f * torch.einsum("tmd,md->tm", y, direction)).sum(0)
    den = f.pow(2).sum(0) * direction.pow(2).sum(1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(num, float("nan")))


@dataclass
class LatentScaling:
    """Latent Scaling of m latents (see the module doc); ``other = 1 − source``."""

    latents: Tensor      #: [m] int64 latent ids
    source: Tensor       #: [m] int64 s*, the source whose decoder row gives the direction
    beta_error: Tensor   #: [m, 2] β_s with the "error" target
    beta_recon: Tensor   #: [m, 2] β_s with the "reconstruction" target
    nu_error: Tensor     #: [m] β_other / β_{s*}, error target
    nu_recon: Tensor     #: [m] β_other / β_{s*}, reconstruction target
    fired: Tensor        #: [m] int64 how many held-out tokens the latent fired on

    def flagged(self, max_nu: float = 0.3) -> Tensor:
        """[m] bool: latents whose other source is still explained by their direction (ν^ε or ν^r > max_nu) —
        those that only look exclusive. NaN ratios (latent never fired) are not flagged."""
        return (self.nu_error > max_nu) | (self.nu_recon > max_nu)


@torch.no_grad()
def latent_scaling(cc: Crosscoder, batches: Iterable[Tensor] | Tensor, latents: Tensor, *,
                   source: Tensor | int | None = None) -> LatentScaling:
    """Latent Scaling of ``latents`` [m] over held-out paired activations (x [T, S=2, d], or an iterable of
    [B, 2, d] batches). ``source``: s* per latent ([m] or one int); default the source with the larger decoder
    norm. Accumulates the sums of :func:`beta_least_squares` batch by batch (memory O(B·m·d)); cc runs in eval
    mode for the code (restored after)."""
    _require_two(cc)
    latents = torch.as_tensor(latents, dtype=torch.int64, device=cc.W_dec.device).reshape(-1)
    if latents.numel() and not (0 <= int(latents.min()) and int(latents.max()) < cc.n):
        raise ValueError(f"latents must lie in [0, {cc.n})")
    W = cc.W_dec.detach()
    if source is None:
        source = W.norm(dim=2)[:, latents].argmax(0)
    source = torch.as_tensor(source, dtype=torch.int64, device=W.device).expand(latents.shape).clone()
    if bool(((source < 0) | (source > 1)).any()):
        raise ValueError("source must be 0 or 1")
    # the code of the requested latents only, not [B, n]: each distinct id gets a column, every other id the spare
    # column u; repeated ids read their column back through ``inverse``
    uniq, inverse = latents.unique(return_inverse=True)
    u = uniq.numel()
    column = torch.full((cc.n,), u, dtype=torch.int64, device=W.device)
    column[uniq] = torch.arange(u, device=W.device)
    rows = W[:, latents]                                     # [2, m, d]: latent j's decoder row per source
    direction = rows[source, torch.arange(latents.numel(), device=W.device)]  # [m, d]
    dot_rows = (rows * direction).sum(-1)                    # [2, m]: ⟨W_dec[s, j], d_j⟩
    num_e = W.new_zeros(2, latents.numel(), dtype=torch.float64)
    num_r = torch.zeros_like(num_e)
    f2 = W.new_zeros(latents.numel(), dtype=torch.float64)
    fired = torch.zeros(latents.numel(), dtype=torch.int64, device=W.device)
    was_training = cc.training
    cc.eval()
    try:
        for x in ([batches] if isinstance(batches, Tensor) else batches):
            cc.check_input(x)
            if x.shape[0] == 0:
                continue  # an empty batch adds nothing to the sums (and the encoder refuses it)
            values, indices = cc.encode(x)
            x_hat = cc.decode(values, indices)
            f = values.new_zeros(x.shape[0], u + 1).scatter_add_(1, column[indices], values)[:, inverse]  # [B, m]
            err_proj = torch.einsum("bsd,md->bsm", x - x_hat, direction)                        # ⟨x_s − x̂_s, d_j⟩
            rec_proj = torch.einsum("bsd,md->bsm", x_hat - cc.b_dec.detach()[None], direction)  # ⟨x̂_s − b_dec, d_j⟩
            fd = f.double()
            # adding latent j's own term f_j W_dec[s, j] back to the error adds f_j² ⟨W_dec[s, j], d_j⟩
            num_e += (fd[:, None] * err_proj.double()).sum(0) + fd.pow(2).sum(0) * dot_rows.double()
            num_r += (fd[:, None] * rec_proj.double()).sum(0)
            f2 += fd.pow(2).sum(0)
            fired += (f > 0).sum(0)
    finally:
        cc.train(was_training)
    den = f2 * direction.double().pow(2).sum(1)  # [m]
    nan = torch.full_like(den, float("nan"))
    beta_e = torch.where(den > 0, num_e / den.clamp_min(1e-300), nan).T.to(W.dtype)  # [m, 2]
    beta_r = torch.where(den > 0, num_r / den.clamp_min(1e-300), nan).T.to(W.dtype)
    ar = torch.arange(latents.numel(), device=W.device)

    def ratio(beta: Tensor) -> Tensor:
        own = beta[ar, source]
        return torch.where(own != 0, beta[ar, 1 - source] / own, torch.full_like(own, float("nan")))

    return LatentScaling(latents=latents, source=source, beta_error=beta_e, beta_recon=beta_r,
                         nu_error=ratio(beta_e), nu_recon=ratio(beta_r), fired=fired)


# ---- nulls and checks for "exclusive" -------------------------------------------------------------------------------


@torch.no_grad()
def firing_counts(cc: Crosscoder, batches: Iterable[Tensor] | Tensor) -> tuple[Tensor, int]:
    """(counts [n] int64, tokens): on how many tokens of the paired batches ([T, S, d] or an iterable of
    [B, S, d]) each latent's code is > 0 (eval mode, restored after), and the number of tokens."""
    counts = torch.zeros(cc.n, dtype=torch.int64, device=cc.W_dec.device)
    tokens = 0
    was_training = cc.training
    cc.eval()
    try:
        for x in ([batches] if isinstance(batches, Tensor) else batches):
            if x.shape[0] == 0:
                continue
            values, indices = cc.encode(x)
            # a latent appears at most once per row of the code, so counting its active slots counts tokens;
            # inactive slots land in the spare bin n (no [B, n] tensor)
            counts += torch.bincount(torch.where(values > 0, indices, cc.n).reshape(-1), minlength=cc.n + 1)[:cc.n]
            tokens += x.shape[0]
    finally:
        cc.train(was_training)
    return counts, tokens


def specificity(counts_a: Tensor, tokens_a: int, counts_b: Tensor, tokens_b: int) -> Tensor:
    """[n] float64 log of latent firing rates on text A over text B, add-½ smoothed:
    ``log((c_a + ½) / (T_a + 1)) − log((c_b + ½) / (T_b + 1))``; > 0 = fires more often on A."""
    if tokens_a < 1 or tokens_b < 1:
        raise ValueError(f"specificity needs tokens on both texts, got {tokens_a} and {tokens_b}")
    a = (counts_a.double() + 0.5) / (tokens_a + 1)
    b = (counts_b.double() + 0.5) / (tokens_b + 1)
    return a.log() - b.log()


def source_partners(cc_a: Crosscoder, cc_b: Crosscoder, latents: Tensor, source: int) -> tuple[Tensor, Tensor]:
    """(partner [m] int64, cos [m]): for each of ``latents`` [m] of ``cc_a``, the latent of ``cc_b`` whose
    decoder row in ``source`` has the largest signed cosine with ``cc_a``'s row in that source. Matching on the
    one source's rows, not the concatenated rows, so an exclusive latent can find a shared partner (which the
    concatenated rows would disfavour)."""
    _require_two(cc_a)
    _require_two(cc_b)
    if cc_a.d != cc_b.d:
        raise ValueError(f"the crosscoders have d={cc_a.d} and d={cc_b.d}")
    if source not in (0, 1):
        raise ValueError(f"source must be 0 or 1, got {source!r}")
    latents = torch.as_tensor(latents, dtype=torch.int64, device=cc_a.W_dec.device).reshape(-1)
    rows_a = torch.nn.functional.normalize(cc_a.W_dec.detach()[source, latents].double(), dim=1)
    rows_b = torch.nn.functional.normalize(cc_b.W_dec.detach()[source].double(), dim=1).to(rows_a.device)
    if latents.numel() == 0:
        return latents.clone(), rows_a.new_zeros(0)
    cos, partner = (rows_a @ rows_b.T).max(dim=1)
    return partner, cos


def exclusive_replication(cc_a: Crosscoder, exclusive_a: Tensor, cc_b: Crosscoder, exclusive_b: Tensor,
                          eligible_b: Tensor, source: int, *, min_cos: float = 0.7) -> dict:
    """Do the latents of ``cc_a`` marked ``exclusive_a`` [n] bool (exclusive to ``source``) come back in ``cc_b``?

    Each is matched to its :func:`source_partners` partner in ``cc_b``; it is *found* when that cosine is >=
    ``min_cos`` and *replicated* when, in addition, the partner is marked ``exclusive_b`` [n] bool (exclusive to the
    same source) and is eligible. Null: the partners' labels drawn at random among ``eligible_b`` [n] bool (e.g. the latents of
    ``cc_b`` that fire), so each found latent replicates with probability q = #(exclusive_b & eligible_b) /
    #eligible_b; ``p_value`` = P(Binomial(found, q) >= replicated), one-sided. Returns ``{"exclusive", "found",
    "replicated", "q", "chance_expected", "p_value"}`` (NaN p-value with nothing found)."""
    ids = exclusive_a.nonzero().squeeze(1)
    partner, cos = source_partners(cc_a, cc_b, ids, source)
    found = cos >= min_cos
    marked = (exclusive_b & eligible_b).to(partner.device)
    replicated = int((found & marked[partner]).sum()) if ids.numel() else 0
    n_found, n_eligible = int(found.sum()), int(eligible_b.sum())
    q = float(marked.sum()) / n_eligible if n_eligible else math.nan
    p_value = float(binom.sf(replicated - 1, n_found, q)) if n_found and not math.isnan(q) else math.nan
    return {"exclusive": int(ids.numel()), "found": n_found, "replicated": replicated, "q": q,
            "chance_expected": n_found * q if not math.isnan(q) else math.nan, "p_value": p_value}
