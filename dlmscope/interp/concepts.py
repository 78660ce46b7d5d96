"""Do SAE latents recover planted concepts? Per-concept detection F1 of the best latent.

Ground truth is a label table: every token carries at most one planted concept (``label_table[token_id]``, the
concept's index or -1; the embedded world's is ``dlmscope.world.concept_id_table``). A latent *detects* concept
``c`` on a token when it is among the token's ``k`` active latents with a positive value. Over a set of labelled
tokens, for latent ``j`` and concept ``c``::

    TP[j, c] = #tokens labelled c on which j fires
    precision = TP / fires[j],   recall = TP / count[c],   F1 = 2 TP / (fires[j] + count[c])

and the score of concept ``c`` is the F1 of its best latent (``argmax_j F1[j, c]``). Tokens without a label
count as negatives for every concept (a latent that also fires on unlabelled words loses precision).

Two views for a DLM (:func:`labelled_activations`):
``clean``   activations of clean text at every non-pad position, labelled by the token there (what
            auto-interpretability uses);
``masked``  activations at *masked* positions of corrupted text, labelled by the hidden token — does a
            Mask-SAE latent announce the concept the model is about to fill in?

A score is read against its controls (:mod:`dlmscope.interp.baselines`): several untrained SAEs with the trained
``b_dec`` and scale, and the best single residual coordinate.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from dlmscope.data.activations import harvest

__all__ = ["ConceptScores", "concept_counts", "concept_f1", "labelled_activations", "labelled_activations_by_layer",
           "score_concepts"]


@dataclasses.dataclass
class ConceptScores:
    """Best latent per concept. Lists are in ``names`` order; ``f1_matrix`` is ``[n_latents, n_concepts]``."""

    names: list[str]
    best_latent: list[int]
    f1: list[float]
    precision: list[float]
    recall: list[float]
    support: list[int]
    f1_matrix: Tensor

    @property
    def median_f1(self) -> float:
        """Median over the concepts that occur at least once."""
        vals = [f for f, s in zip(self.f1, self.support) if s > 0]
        return float(statistics.median(vals)) if vals else float("nan")  # the mean of the middle two if even

    def as_dict(self) -> dict:
        return {"median_f1": self.median_f1,
                "concepts": {name: {"latent": j, "f1": f, "precision": p, "recall": r, "support": s}
                             for name, j, f, p, r, s in zip(self.names, self.best_latent, self.f1, self.precision,
                                                            self.recall, self.support)}}


def concept_counts(values: Tensor, indices: Tensor, labels: Tensor, n_latents: int, n_concepts: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Counts for F1 from sparse codes.

    ``values``/``indices``: ``[N, k]`` Top-K codes; ``labels``: ``[N]`` int, concept index or -1.
    Returns ``(tp [n_latents, n_concepts], fires [n_latents], count [n_concepts])`` as int64.
    """
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(f"values and indices must both be [N, k], got {tuple(values.shape)} and "
                         f"{tuple(indices.shape)}")
    if labels.shape != values.shape[:1]:
        raise ValueError(f"labels must be [N] = [{values.shape[0]}], got {tuple(labels.shape)}")
    labels = labels.to(indices.device).long()
    if labels.numel() and (int(labels.max()) >= n_concepts or int(labels.min()) < -1):
        raise ValueError(f"labels must lie in -1..{n_concepts - 1}")
    on = values > 0
    idx = indices.long()
    fires = torch.zeros(n_latents, dtype=torch.int64, device=idx.device)
    fires.index_add_(0, idx[on], torch.ones_like(idx[on]))
    lab = labels.unsqueeze(1).expand_as(idx)
    hit = on & (lab >= 0)
    tp = torch.zeros(n_latents * n_concepts, dtype=torch.int64, device=idx.device)
    flat = idx[hit] * n_concepts + lab[hit]
    tp.index_add_(0, flat, torch.ones_like(flat))
    count = torch.bincount(labels[labels >= 0], minlength=n_concepts)
    return tp.view(n_latents, n_concepts), fires, count


def _f1_matrix(tp: Tensor, fires: Tensor, count: Tensor) -> Tensor:
    tp_f, denom = tp.double(), fires.double()[:, None] + count.double()[None, :]
    return torch.where(denom > 0, 2 * tp_f / denom.clamp_min(1), torch.zeros_like(denom))


def concept_f1(tp: Tensor, fires: Tensor, count: Tensor, names: Sequence[str],
               select: tuple[Tensor, Tensor, Tensor] | None = None) -> ConceptScores:
    """:class:`ConceptScores` from the counts of :func:`concept_counts` (ties: the lowest latent index).

    ``select``: counts ``(tp, fires, count)`` of a *separate* set of tokens on which the best latent per concept
    is chosen; the scores are then those of that latent on the first set (no selection bias: the max over
    ``n`` latents of an F1 measured on the same tokens is optimistic, most for rare concepts). Default: choose
    and score on the same tokens.
    """
    f1 = _f1_matrix(tp, fires, count)
    best = (_f1_matrix(*select) if select is not None else f1).argmax(0)
    cols = torch.arange(f1.shape[1])
    tp_best = tp.double()[best, cols]
    fires_best, count_f = fires.double()[best], count.double()
    precision = torch.where(fires_best > 0, tp_best / fires_best.clamp_min(1), torch.zeros_like(tp_best))
    recall = torch.where(count_f > 0, tp_best / count_f.clamp_min(1), torch.zeros_like(tp_best))
    return ConceptScores(names=list(names), best_latent=best.tolist(), f1=f1[best, cols].tolist(),
                         precision=precision.tolist(), recall=recall.tolist(), support=count.tolist(),
                         f1_matrix=f1)


@torch.no_grad()
def labelled_activations(adapter, token_batches: Iterable[Tensor], layer: int, label_table: Tensor,
                         view: str = "clean", *, t: float = 0.3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(activations [N, d], labels [N])`` of block ``layer``'s output for concept scoring.

    ``token_batches``: ``[B, T]`` id tensors (no padding). ``label_table[token_id]`` = concept index or -1.
    ``view="clean"``: every position of the clean text; ``view="masked"``: the masked positions of the text
    corrupted at rate ``t`` (position 0 never masked), labelled by the hidden token.
    """
    return labelled_activations_by_layer(adapter, token_batches, [layer], label_table, view, t=t, seed=seed)[
        adapter.check_layer(layer)]


def labelled_activations_by_layer(adapter, token_batches: Iterable[Tensor], layers: Sequence[int],
                                  label_table: Tensor, view: str = "clean", *, t: float = 0.3,
                                  seed: int = 0) -> dict[int, tuple[Tensor, Tensor]]:
    """:func:`labelled_activations` of several layers from one forward per batch: ``{layer: (activations
    [N, d], labels [N])}``, each layer's equal to its own call's (the same corruption for every layer)."""
    if view not in ("clean", "masked"):
        raise ValueError(f"view must be 'clean' or 'masked', got {view!r}")
    layers = sorted({adapter.check_layer(L) for L in layers})
    if not layers:
        raise ValueError("labelled_activations_by_layer needs at least one layer")
    gen = torch.Generator().manual_seed(seed)
    acts: dict[int, list[Tensor]] = {L: [] for L in layers}
    labels = []
    for ids in token_batches:
        policy = "clean" if view == "clean" else "mask"
        out, info = harvest(adapter, ids, layers, policy, t_min=t, t_max=t, generator=gen, return_info=True)
        keep = info["keep"].to(ids.device)
        for L in layers:
            acts[L].append(out[L].float())
        labels.append(label_table[ids][keep])
    if not labels:
        raise ValueError("labelled_activations got no token batches")
    kept = torch.cat(labels)
    return {L: (torch.cat(acts[L]), kept) for L in layers}


@torch.no_grad()
def _counts(sae, activations: Tensor, labels: Tensor, n_concepts: int, batch_size: int):
    if activations.dim() != 2 or activations.shape[0] != labels.shape[0]:
        raise ValueError(f"activations must be [N, d] with N = len(labels) = {labels.shape[0]}, "
                         f"got {tuple(activations.shape)}")
    n_lat = int(sae.n)
    tp = torch.zeros(n_lat, n_concepts, dtype=torch.int64)
    fires = torch.zeros(n_lat, dtype=torch.int64)
    count = torch.zeros(n_concepts, dtype=torch.int64)
    dtype = next(sae.parameters()).dtype
    for x, lab in zip(activations.split(batch_size), labels.split(batch_size)):
        values, indices = sae.encode(x.to(dtype))
        a, b, c = concept_counts(values, indices, lab, n_lat, n_concepts)
        tp += a.cpu()
        fires += b.cpu()
        count += c.cpu()
    return tp, fires, count


def score_concepts(sae, activations: Tensor, labels: Tensor, names: Sequence[str], *,
                   select_on: tuple[Tensor, Tensor] | None = None, batch_size: int = 8192) -> ConceptScores:
    """Best-latent F1 per concept of ``sae`` on labelled activations (see the module docstring).

    ``select_on = (activations, labels)`` of other tokens: choose each concept's best latent there and score
    it on ``activations`` (held-out F1). Without it, choice and score use the same tokens (optimistic).
    """
    counts = _counts(sae, activations, labels, len(names), batch_size)
    select = _counts(sae, *select_on, len(names), batch_size) if select_on is not None else None
    return concept_f1(*counts, names, select=select)
