"""Steering with SAE features during generation (docs/reference.md §5): ``h ← h + Σ_f α_f · m(h) · v_f`` at a
block.

``v_f`` is feature f's unit decoder row; ``m(h)`` is the position's largest SAE activation computed with the
SAE's exact encoder (``b_dec`` subtracted, as in training — the paper's steering code forgot it), or 1 with
``strength="constant"``. :func:`steer` is a context manager: inside it, every forward of the model adds the
vector at block ``layer``'s output, at the positions of ``scope`` and the denoising steps of ``schedule``.
Samplers (:mod:`dlmscope.models.sampling`) publish their step, so schedules and the ``generation`` / ``decoded``
scopes know where a run is; outside a sampler a forward counts as step 0 of 1.

Scopes: ``all`` (every position: the paper), ``generation`` (not the prompt), ``masked`` (still masked at
this step), ``decoded`` (generated and already committed), ``top_active`` (per feature, the ``top_active``
positions of each row where the feature's own activation is largest: the paper's ``topk_tokens``), a bool
tensor ``[B, T]`` / ``[T]``, or a callable ``(input_ids [B, T], progress) -> bool [B, T]``.
Schedules: ``all``, ``("first", frac)`` / ``("last", frac)`` of the steps, a collection of step indices, or a
callable ``(step, steps) -> bool``.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dlmscope.util.choices import check_choice
from dlmscope.models import hooks
from dlmscope.models.sampling import Progress, current_progress
from .steering_stats import FLUENCY_WEIGHT, paper_score

__all__ = ["steer", "SCOPES", "STRENGTHS", "steering_vectors", "SteeringResult", "steering_score",
           "generation_perplexity", "SteeringBaseline", "steering_baseline", "FLUENCY_WEIGHT", "steered_generations",
           "alive_latents", "random_directions", "norm_ratio", "control_runs"]

SCOPES = ("all", "generation", "masked", "decoded", "top_active")
STRENGTHS = ("max_act", "constant")


def _features(sae, features) -> Tensor:
    ids = torch.as_tensor(features if not isinstance(features, int) else [features])
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"features must be a latent index or a non-empty list of them, got {features!r}")
    bad = ids[(ids < 0) | (ids >= sae.n)]
    if bad.numel():
        raise ValueError(f"feature index {int(bad[0])} out of range for an SAE with n={sae.n} latents")
    return ids.long()


def _alphas(alpha, n: int) -> Tensor:
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
    if a.numel() == 1:
        a = a.expand(n)
    if a.numel() != n:
        raise ValueError(f"alpha has {a.numel()} values for {n} features")
    if not torch.isfinite(a).all():
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    return a.clone()


def _schedule(schedule):
    """``(step, steps) -> bool``."""
    if callable(schedule):
        return schedule
    if schedule == "all":
        return lambda step, steps: True
    if isinstance(schedule, tuple) and len(schedule) == 2 and schedule[0] in ("first", "last"):
        which, frac = schedule
        if not (isinstance(frac, (int, float)) and 0 < frac <= 1):
            raise ValueError(f"schedule fraction must be in (0, 1], got {frac!r}")
        if which == "first":
            return lambda step, steps: step < max(1, math.ceil(frac * steps))
        return lambda step, steps: step >= steps - max(1, math.ceil(frac * steps))
    if isinstance(schedule, (list, set, frozenset, range)):
        chosen = {int(s) for s in schedule}
        return lambda step, steps: step in chosen
    if isinstance(schedule, str):
        check_choice("schedule", schedule, ("all",))
    raise ValueError(f"schedule must be 'all', ('first' | 'last', fraction), a list of steps or a callable, "
                     f"got {schedule!r}")


def steering_vectors(sae, features) -> Tensor:
    """``[F, d]``: the unit decoder rows of ``features``."""
    W = sae.W_dec.detach()[_features(sae, features)].float()
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _positions(scope, ids: Tensor | None, progress: Progress, T: int, mask_id: int | None, device) -> Tensor | None:
    """``[B, T]`` bool of the positions a (non-``top_active``) scope steers; None = all."""
    if scope == "all":
        return None
    if isinstance(scope, Tensor):
        return scope.to(device=device, dtype=torch.bool).expand(ids.shape if ids is not None else (1, T))
    if callable(scope):
        return scope(ids, progress).to(device=device, dtype=torch.bool)
    if ids is None:
        raise RuntimeError(f"scope {scope!r} needs the input ids, but the model was called without them")
    B = ids.shape[0]
    total = int(progress.prompt_lengths.max()) + progress.step if progress.causal else T
    pos = torch.arange(total - T, total, device=device).expand(B, T)
    generated = pos >= progress.prompt_lengths.to(device)[:, None]
    masked = ids == mask_id if mask_id is not None else torch.zeros_like(generated)
    if scope == "generation":
        return generated
    if scope == "masked":
        return masked
    return generated & ~masked                                                  # decoded


@contextlib.contextmanager
def steer(adapter, layer: int, sae, features, alpha, *, strength: str = "max_act", scope="all", schedule="all",
          top_active: int = 3, directions: Tensor | None = None, record: list | None = None) -> Iterator[None]:
    """Within the block, every forward of ``adapter``'s model adds ``Σ_f alpha_f · m(h) · v_f`` to block
    ``layer``'s output (module docstring). ``features`` is one latent index or several; ``alpha`` one value
    or one per feature. ``directions [F, d]`` replaces the features' decoder rows by other directions (made
    unit norm; a control: ``m(h)`` and the ``top_active`` positions still come from the SAE and ``features``).
    ``record``: each steered forward appends a ``[2]`` tensor, the sums of ``‖added‖`` and of ``‖h‖`` over the
    positions in scope (:func:`norm_ratio` of the list is their ratio)."""
    module = adapter.hook_module(layer)  # ValueError if out of range
    if getattr(sae, "d", None) != adapter.d_model:
        raise ValueError(f"SAE input size d={getattr(sae, 'd', None)} does not match the model's hidden size "
                         f"{adapter.d_model}")
    feats = _features(sae, features)
    alphas = _alphas(alpha, feats.numel())
    check_choice("strength", strength, STRENGTHS)
    if isinstance(scope, str):
        check_choice("scope", scope, SCOPES)
    if not isinstance(scope, (str, Tensor)) and not callable(scope):
        raise ValueError(f"scope must be one of {SCOPES}, a bool tensor or a callable, got {type(scope).__name__}")
    if scope in ("masked", "decoded"):
        adapter.require_mask_token()
    if isinstance(top_active, bool) or not isinstance(top_active, int) or top_active < 1:
        raise ValueError(f"top_active must be a positive integer, got {top_active!r}")
    active = _schedule(schedule)
    mask_id = adapter.mask_token_id
    if directions is None:
        vectors = steering_vectors(sae, feats)                                  # [F, d]
    else:
        vectors = torch.as_tensor(directions).detach().float().reshape(-1, adapter.d_model)
        if vectors.shape[0] != feats.numel():
            raise ValueError(f"directions has {vectors.shape[0]} rows for {feats.numel()} features")
        vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def delta(x: Tensor) -> Tensor | None:
        """``[B, T, d]``: what is added to the block's output ``x [B, T, d]`` (None outside the schedule)."""
        progress = current_progress() or Progress(0, 1, torch.zeros(x.shape[0], dtype=torch.long))
        if not active(progress.step, progress.steps):
            return None
        sae_dtype = sae.W_enc.dtype
        xs = x.to(sae_dtype)
        if strength == "max_act":
            m = sae.encode(xs)[0].max(-1).values.clamp_min(0).float()           # [B, T]
        else:
            m = torch.ones(x.shape[:2], device=x.device)
        v = vectors.to(x.device)
        a = alphas.to(device=x.device, dtype=torch.float32)
        if scope == "top_active":
            W_enc, b_enc, b_dec = sae.W_enc[feats], sae.b_enc[feats], sae.b_dec
            act = torch.relu((xs - b_dec) @ W_enc.T + b_enc).float()            # [B, T, F]
            k = min(top_active, x.shape[1])
            top = torch.zeros_like(act, dtype=torch.bool).scatter_(1, act.topk(k, dim=1).indices, True)
            added = torch.einsum("btf,f,fd->btd", top.float() * m[..., None], a, v)
            return _recorded(added, x, top.any(-1), record)
        pm = _positions(scope, seen.ids, progress, x.shape[1], mask_id, x.device)
        weight = m if pm is None else m * pm.float()
        added = weight[..., None] * (a @ v)
        return _recorded(added, x, pm, record)

    with hooks.record_input_ids(adapter.model) as seen, hooks.intervene(module, delta):
        yield


def _recorded(added: Tensor, x: Tensor, where: Tensor | None, record: list | None) -> Tensor:
    """``added``, after appending ``[Σ ‖added‖, Σ ‖h‖]`` over ``where`` (``[B, T]``, None = all) and ``h ≠ 0`` to
    ``record``."""
    if record is not None:
        h = x.float().norm(dim=-1)                                                        # [B, T]
        w = (h > 0).float() if where is None else where.float() * (h > 0)   # padding's h is exactly 0: left out
        record.append(torch.stack([(added.float().norm(dim=-1) * w).sum(), (h * w).sum()]).detach().cpu())
    return added


def norm_ratio(record: Sequence[Tensor]) -> float:
    """``Σ ‖α·m(h)·v‖ / Σ ‖h‖`` over the positions a :func:`steer` ``record`` saw (NaN if none): a ratio of
    totals, so positions where ‖h‖ is near 0 (padding) cannot dominate it as they would a mean of ratios."""
    if not record:
        return float("nan")
    total = torch.stack(list(record)).sum(0)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def random_directions(d: int, n: int, *, seed: int = 0) -> Tensor:
    """``[n, d]`` unit directions drawn uniformly on the sphere (a Gaussian, normalised), seeded."""
    g = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (g / g.norm(dim=-1, keepdim=True)).float()


@torch.no_grad()
def alive_latents(adapter, layer: int, sae, sequences: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The latents (sorted ids) that are among the top k at some attended position of ``sequences [B, T]``
    at block ``layer`` (e.g. the unsteered generations: alive on the text the sweep steers)."""
    ids = sequences.to(adapter.device)
    mask = attention_mask.to(adapter.device) if attention_mask is not None else None
    h = adapter.forward_until(ids, [layer], mask)[layer]
    values, indices = sae.encode(h.to(sae.W_enc.dtype).reshape(-1, h.shape[-1]))
    keep = values > 0
    if mask is not None:
        keep &= mask.reshape(-1, 1).bool()
    return torch.unique(indices[keep]).cpu()


# ------------------------------------------------------------------------------------------------ score
def _texts(adapter, gen, gen_length: int) -> tuple[list[str], list[str]]:
    """``(prompts, generations)`` as text (special tokens dropped)."""
    tok = adapter.tokenizer
    prompts, outs = [], []
    for b in range(gen.sequences.shape[0]):
        n = int(gen.prompt_lengths[b])
        prompts.append(tok.decode(gen.sequences[b, :n].tolist(), skip_special_tokens=True))
        outs.append(tok.decode(gen.sequences[b, n:n + gen_length].tolist(), skip_special_tokens=True))
    return prompts, outs


@torch.no_grad()
def generation_perplexity(ref_lm, prompts: Sequence[str], generations: Sequence[str], *,
                          batch_size: int = 64) -> list[float]:
    """Per text, the perplexity of the generation given its prompt under the causal LM ``ref_lm`` (an
    adapter); texts are re-tokenised with its tokenizer, so any reference model works. NaN for an empty
    generation. Rows are right-padded into batches: a causal model's scores do not see the padding."""
    tok = ref_lm.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = []
    for prompt, text in zip(prompts, generations):
        p = bos + tok(prompt, add_special_tokens=False)["input_ids"]
        rows.append((p, tok(text, add_special_tokens=False)["input_ids"]))
    out = [float("nan")] * len(rows)
    scored = [i for i, (_, g) in enumerate(rows) if g]
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        seqs = [rows[i][0] + rows[i][1] for i in chunk]
        T = max(map(len, seqs))
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), T), dtype=torch.long)
        target = torch.full((len(chunk), T), -100, dtype=torch.long)           # -100: not a generated token
        for r, (i, seq) in enumerate(zip(chunk, seqs)):
            n_p = len(rows[i][0])
            ids[r, :len(seq)] = torch.tensor(seq)
            attn[r, :len(seq)] = 1
            target[r, n_p - 1:len(seq) - 1] = ids[r, n_p:len(seq)]           # position j predicts token j + 1
        target = target.to(ref_lm.device)
        logits = ref_lm.logits(ids.to(ref_lm.device), attn.to(ref_lm.device)).float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [b, T]
        mean_ce = (ce.sum(1) / (target != -100).sum(1)).tolist()           # only [b] numbers leave the device
        for i, m in zip(chunk, mean_ce):
            out[i] = math.exp(m)
    return out


@dataclass
class SteeringBaseline:
    """The unsteered generations of a prompt set, shared by every steered run with the same sampler and seed."""

    prompts: list[str]
    generations: list[str]
    #: per prompt, the reference-LM perplexity of its generation (NaN if empty)
    ppls: list[float]
    seed: int
    #: (judge, concept) -> the judge's scores of the generations, so each is judged once per sweep
    judged: dict = field(default_factory=dict, repr=False, compare=False)
    #: the sampler's output (``sequences``, ``attention_mask``), e.g. to find the latents alive on it
    generation: object = field(default=None, repr=False, compare=False)

    def judge(self, judge, concept: str) -> list:
        key = (id(judge), concept)
        if key not in self.judged:
            self.judged[key] = judge.score(concept, self.generations)
        return self.judged[key]


def steering_baseline(adapter, prompts, generate: Callable, gen_length: int, ref_lm, *, seed: int = 0
                      ) -> SteeringBaseline:
    """Run ``generate(adapter, prompts, seed=seed)`` without steering and measure its fluency once."""
    gen = generate(adapter, prompts, seed=seed)
    p_text, texts = _texts(adapter, gen, gen_length)
    return SteeringBaseline(p_text, texts, generation_perplexity(ref_lm, p_text, texts), seed, generation=gen)


def steered_generations(adapter, prompts, generate: Callable, gen_length: int, layer: int, sae, features, alpha,
                        ref_lm, *, seed: int = 0, **steer_kw) -> tuple[list[str], list[float], float]:
    """``(generations, perplexities, norm ratio)`` of ``generate(adapter, prompts, seed=seed)`` while
    ``features`` are steered (:func:`steer`'s keywords, e.g. ``directions`` for a random-direction control):
    per prompt the text and its reference-LM perplexity given the prompt, and the mean ``‖α·m(h)·v‖ / ‖h‖``."""
    record: list = []
    with steer(adapter, layer, sae, features, alpha, record=record, **steer_kw):
        out = generate(adapter, prompts, seed=seed)
    p_text, texts = _texts(adapter, out, gen_length)
    return texts, generation_perplexity(ref_lm, p_text, texts), norm_ratio(record)


@dataclass
class SteeringResult:
    """One feature's steering score over a set of prompts (the baseline and the steered run share the seed)."""

    #: mean judge score of the baseline and steered generations (failed judgements dropped), in [0, 1]
    concept_before: float
    concept_after: float
    #: mean reference-LM perplexity of the generations
    ppl_before: float
    ppl_after: float
    #: the paper's score: ``(concept_after − concept_before) + FLUENCY_WEIGHT · (ppl_before − ppl_after) / ppl_before``
    score: float
    #: judgements that failed (excluded from the means)
    failed: int
    generations_before: list[str]
    generations_after: list[str]
    #: per prompt: judge scores (None = failed) and perplexities, for paired intervals (:mod:`dlmscope.util.bootstrap`)
    concepts_before: list = field(default_factory=list)
    concepts_after: list = field(default_factory=list)
    ppls_before: list = field(default_factory=list)
    ppls_after: list = field(default_factory=list)
    #: the mean ``‖α·m(h)·v‖ / ‖h‖`` at the steered positions (every step and forward of the steered run)
    norm_ratio: float = float("nan")


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def steering_score(adapter, prompts, generate: Callable, gen_length: int, layer: int, sae, features, alpha,
                   concept: str, judge, ref_lm, *, seed: int = 0, baseline: SteeringBaseline | None = None,
                   **steer_kw) -> SteeringResult:
    """Steer ``features`` at ``layer`` while ``generate(adapter, prompts, seed=seed)`` runs (a sampler of
    :mod:`dlmscope.models.sampling` with its settings bound), against the same call without steering and the same
    seed (``baseline``: that call, already made by :func:`steering_baseline`); the judge scores the
    generations (not the prompt) for ``concept``; fluency is the perplexity of the generations under
    ``ref_lm``."""
    if baseline is None:
        baseline = steering_baseline(adapter, prompts, generate, gen_length, ref_lm, seed=seed)
    elif baseline.seed != seed or len(baseline.generations) != len(prompts):
        raise ValueError(f"the baseline was run with seed {baseline.seed} on {len(baseline.generations)} prompts; "
                         f"this run uses seed {seed} on {len(prompts)}")
    after_text, ppls_after, ratio = steered_generations(adapter, prompts, generate, gen_length, layer, sae,
                                                        features, alpha, ref_lm, seed=seed, **steer_kw)
    c_before, c_after = baseline.judge(judge, concept), judge.score(concept, after_text)
    failed = sum(x is None for x in c_before + c_after)
    cb, ca = _mean(c_before), _mean(c_after)
    pb, pa = _mean(baseline.ppls), _mean(ppls_after)
    return SteeringResult(cb, ca, pb, pa, paper_score(cb, ca, pb, pa), failed,
                          list(baseline.generations), after_text, list(c_before), list(c_after),
                          list(baseline.ppls), ppls_after, ratio)


def control_runs(adapter, sae, prompts, generate: Callable, gen_length: int, layer: int, conditions: Sequence[tuple],
                 ref_lm, baseline: SteeringBaseline, *, kinds: Sequence[str], draws: int = 1, exclude=(),
                 seed: int = 0, strength: str = "max_act", on_run: Callable | None = None) -> dict:
    """The control runs of each ``(scope, schedule, α)`` of ``conditions``, to be judged for any concept:
    ``{"latents", "pool", "runs": [per condition: {kind: [per draw (texts, perplexities, norm ratio)] or a
    reason it did not run]}}``. ``random_latent`` steers a random latent alive on the baseline generations (not
    one of ``exclude``, the steered ones); ``random_direction`` a random unit direction. The same ``draws``
    latents and directions serve every condition; at the same α the norm ``‖α·m(h)·v‖`` matches the steered
    latent's by construction (``v`` unit, ``m(h)`` the position's largest activation over all latents)."""
    exclude = set(exclude)
    gen = baseline.generation
    alive = alive_latents(adapter, layer, sae, gen.sequences, getattr(gen, "attention_mask", None)).tolist()
    pool = [i for i in alive if i not in exclude]
    note = f"{len(pool)} latents alive on the baseline generations, the steered ones excluded"
    if not pool:
        pool = [i for i in range(sae.n) if i not in exclude]
        note = f"no unsteered latent alive on the baseline generations: drawn from all {len(pool)} unsteered"
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:draws]
    latents = [pool[int(j)] for j in order]
    directions = random_directions(adapter.d_model, draws, seed=seed)
    runs = []
    for scope, schedule, a in conditions:
        kw = dict(seed=seed, scope=scope, schedule=schedule, strength=strength)
        cell = {}
        for kind in kinds:
            if kind == "random_latent":
                cell[kind] = [steered_generations(adapter, prompts, generate, gen_length, layer, sae, f, a, ref_lm,
                                                  **kw) for f in latents] or "no unsteered latent"
            elif scope == "top_active":
                cell[kind] = "top_active positions follow a latent's activation; a direction has none"
            else:   # the direction replaces latent 0's decoder row; m(h) does not depend on the latent
                cell[kind] = [steered_generations(adapter, prompts, generate, gen_length, layer, sae, 0, a, ref_lm,
                                                  directions=v[None], **kw) for v in directions]
            if on_run is not None:
                on_run()
        runs.append(cell)
    return {"latents": latents, "pool": note, "runs": runs}
