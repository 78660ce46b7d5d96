"""Samplers for masked diffusion LMs (LLaDA's and Dream's published algorithms) and for AR baselines.

All three take an adapter (:mod:`dlmscope.models`) and a batch of prompts of different lengths. Prompts are
left-aligned: row ``b`` is ``prompt_b``, then its generated tokens, then ``[PAD]`` up to the longest row; pads
are never attended. Every sampler returns a :class:`Generation`; ``history=True`` keeps the canvas before the
first step and after every step, and which positions each step committed (the input of decoding-order
analysis). ``callback(state)`` sees a :class:`SamplerState` at every step, before the commit; it gets copies,
so it may record but cannot change the run.

Everything stays on the model's device and dtype; the only float64 is the Gumbel noise of LLaDA's
temperature sampling, and the commit counts are fixed by the schedule, so no step waits on the device.
The algorithms follow docs/reference.md §8 (LLaDA's ``generate`` and Dream's ``diffusion_generate``).

``llada_fill`` / ``dream_fill`` run the same algorithms on a given canvas whose ``[MASK]`` tokens may sit
anywhere (fill-in tasks with known answers, for decoding-order studies). A ``guide`` (an object with
``attach(adapter)`` — a context manager for its hooks — and ``rank(confidence, gen_pos, masked) -> scores``)
replaces the confidence a step ranks masked positions by, e.g. with SAE-feature stability
(:class:`dlmscope.analysis.order.SAEStabilityGuide`).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable

import torch

from dlmscope.util.choices import check_choice
from . import Adapter
from .sampler_rules import dream_counts, dream_tokens, step_counts

__all__ = ["Generation", "SamplerState", "Progress", "current_progress", "publish_progress", "llada_generate",
           "llada_fill", "dream_generate", "dream_fill", "ar_generate", "REMASKING", "DREAM_ALGS", "DREAM_SCHEDULES"]

REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
#: how many tokens each Dream step commits: Dream's own timestep counts, or LLaDA's even split (matched commits)
DREAM_SCHEDULES = ("dream", "even")


@dataclass(frozen=True)
class Progress:
    """Where a running sampler is, for hooks inside the model (steering): the step whose forward is running."""

    step: int
    steps: int
    #: ``[B]``: each row's prompt length (generated positions start there)
    prompt_lengths: torch.Tensor
    #: AR generation: the forward may see only the newest positions (a KV cache); the canvas then holds
    #: ``prompt + step`` tokens, and the forward's positions are its last ones
    causal: bool = False


_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("dlmscope_sampling_progress", default=None)


def current_progress() -> Progress | None:
    """The :class:`Progress` of the sampler whose model forward is running, or None outside a sampler."""
    return _PROGRESS.get()


@contextlib.contextmanager
def publish_progress(progress: Progress):
    """Within the block, :func:`current_progress` returns ``progress``: how a sampler (ours, or one written
    elsewhere) tells step-aware hooks such as steering schedules where denoising stands."""
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


@dataclass
class SamplerState:
    """What a callback sees at one step (copies: changing them changes nothing)."""

    #: step index, 0-based, and the total number of steps
    step: int
    steps: int
    #: the canvas before this step's commit ``[B, T]``
    ids: torch.Tensor
    #: positions still masked before this step ``[B, T]`` (bool)
    masked: torch.Tensor
    #: aligned logits ``[B, T, V]`` (position i scores token i); for AR, the next-token scores ``[B, V]``
    logits: torch.Tensor
    #: positions this step commits ``[B, T]`` (bool)
    commit: torch.Tensor


@dataclass
class Generation:
    """A sampler's output. ``T = P + G``: the longest prompt plus the generated length."""

    #: ``[B, T]`` int64: prompt, generated tokens, then ``[PAD]`` (shorter prompts)
    sequences: torch.Tensor
    #: ``[B]``: each row's prompt length (its generation starts there)
    prompt_lengths: torch.Tensor
    #: ``[S + 1, B, T]``: the canvas before the first step and after each step (``history=True``), else None
    history: torch.Tensor | None = None
    #: ``[S, B, T]`` bool: the positions step ``s`` committed (``history=True``), else None
    committed: torch.Tensor | None = None
    #: ``[B, G]``: the canvas positions that were generated (after the prompt; for a fill, the masks given)
    gen_positions: torch.Tensor | None = None
    #: ``[B, T]``: 1 at the positions the model attended (0 at the right padding)
    attention_mask: torch.Tensor | None = None

    def generated(self, gen_length: int | None = None) -> torch.Tensor:
        """``[B, G]``: each row's generated tokens (what follows its prompt, or a fill's answers), the first
        ``gen_length`` of them if given."""
        if self.gen_positions is not None:
            pos = self.gen_positions.to(self.sequences.device)
            return self.sequences.gather(1, pos if gen_length is None else pos[:, :gen_length])
        pos = self.prompt_lengths[:, None].to(self.sequences.device) + torch.arange(gen_length,
                                                                                    device=self.sequences.device)
        return self.sequences.gather(1, pos)


# ------------------------------------------------------------------------------------------------ checks
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _prompts(prompt_ids, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], lengths [B])`` from a ``[P]`` / ``[B, P]`` tensor or a list of id lists."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
        rows = prompt_ids[None] if prompt_ids.dim() == 1 else prompt_ids
        if rows.dim() != 2:
            raise ValueError(f"prompt_ids must be [P] or [B, P], got shape {tuple(prompt_ids.shape)}")
        rows = [r.tolist() for r in rows]
    else:
        rows = [list(r) for r in prompt_ids]
        if rows and not isinstance(rows[0], list):
            raise ValueError("prompt_ids must be a tensor or a list of token-id lists")
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("prompt_ids needs at least one prompt, each with at least one token")
    lengths = torch.tensor([len(r) for r in rows], device=device)
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long, device=device)
    return ids, lengths


def _pad_id(adapter: Adapter) -> int:
    pad = getattr(adapter.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(adapter.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _context(adapter: Adapter) -> int | None:
    cfg = adapter.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "max_sequence_length", None)


def _canvas(adapter: Adapter, prompt_ids, gen_length: int, fill_id: int):
    """``(ids [B, T], attention [B, T], gen_pos [B, G], lengths [B])``: each prompt followed by ``gen_length``
    copies of ``fill_id``, right-padded."""
    pad_id = _pad_id(adapter)
    prompts, lengths = _prompts(prompt_ids, pad_id, adapter.device)
    B, P = prompts.shape
    T = P + gen_length
    limit = _context(adapter)
    if limit is not None and T > limit:
        raise ValueError(f"prompt of {P} tokens + {gen_length} generated = {T} exceeds the model's context of "
                         f"{limit} positions")
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=adapter.device)
    ids[:, :P] = prompts
    gen_pos = lengths[:, None] + torch.arange(gen_length, device=adapter.device)
    ids.scatter_(1, gen_pos, fill_id)
    attention = (torch.arange(T, device=adapter.device) < (lengths + gen_length)[:, None]).long()
    return ids, attention, gen_pos, lengths


def _fill_canvas(adapter: Adapter, canvas_ids, mask_id: int):
    """:func:`_canvas` for a canvas whose ``[MASK]`` tokens are the positions to generate: ``(ids, attention,
    gen_pos [B, G] (the masks, in order), first [B] (each row's first mask))``. Every row needs the same
    number of masks, so that the commit schedule is the same for all of them."""
    pad_id = _pad_id(adapter)
    ids, lengths = _prompts(canvas_ids, pad_id, adapter.device)
    T = ids.shape[1]
    limit = _context(adapter)
    if limit is not None and T > limit:
        raise ValueError(f"canvas of {T} tokens exceeds the model's context of {limit} positions")
    attention = (torch.arange(T, device=ids.device) < lengths[:, None]).long()
    masked = (ids == mask_id) & attention.bool()
    counts = masked.sum(1).tolist()
    if min(counts) == 0 or len(set(counts)) != 1:
        raise ValueError(f"every canvas row needs the same number (>= 1) of {mask_id} (mask) tokens to fill; "
                         f"got {counts}")
    # the masks' positions in order: a stable sort puts the masked positions first, left to right
    order = torch.sort((~masked).to(torch.int8), dim=1, stable=True).indices
    gen_pos = order[:, :counts[0]]
    return ids, attention, gen_pos, gen_pos[:, 0].clone()


class _Recorder:
    """History and callback plumbing shared by the diffusion samplers."""

    def __init__(self, ids, history: bool, callback: Callable | None, steps: int, gen_pos, attention):
        self.gen_pos, self.attention = gen_pos, attention
        self.history = [ids.clone()] if history else None
        self.committed: list[torch.Tensor] | None = [] if history else None
        self.callback, self.steps = callback, steps

    def commit(self, s: int, ids, logits, commit_gen, x0, gen_pos, mask_id: int) -> torch.Tensor:
        """The canvas after step ``s``: ``x0`` ``[B, G]`` written at the committed generated positions
        ``commit_gen`` ``[B, G]``; the callback sees the step before, the history records it after."""
        commit = _to_canvas(commit_gen, gen_pos, ids.shape[1])
        if self.callback is not None:
            self.callback(SamplerState(s, self.steps, ids.clone(), ids == mask_id, logits.clone(), commit.clone()))
        new = ids.scatter(1, gen_pos, torch.where(commit_gen, x0, ids.gather(1, gen_pos)))
        if self.history is not None:
            self.history.append(new)          # a fresh tensor every step: nothing writes to it later
            self.committed.append(commit)
        return new

    def result(self, ids, lengths) -> Generation:
        past = (None, None) if self.history is None else (torch.stack(self.history), torch.stack(self.committed))
        return Generation(ids, lengths, *past, gen_positions=self.gen_pos, attention_mask=self.attention)


def _at_generated(logits: torch.Tensor, gen_pos: torch.Tensor) -> torch.Tensor:
    """``[B, G, V]`` float32: the logits at the generated positions."""
    return logits.gather(1, gen_pos[..., None].expand(-1, -1, logits.shape[-1])).float()


def _to_canvas(gen_mask: torch.Tensor, gen_pos: torch.Tensor, T: int) -> torch.Tensor:
    """A ``[B, G]`` bool over generated positions as a ``[B, T]`` bool over the canvas."""
    out = torch.zeros(gen_mask.shape[0], T, dtype=torch.bool, device=gen_mask.device)
    return out.scatter_(1, gen_pos, gen_mask)


def _top(conf: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, G]`` bool: the ``n`` highest-confidence positions of each row (ties by position)."""
    out = torch.zeros_like(conf, dtype=torch.bool)
    if n > 0:
        out.scatter_(1, torch.topk(conf, n, dim=-1).indices, True)
    return out


def _generator(seed, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else int(seed))
    return gen


# ------------------------------------------------------------------------------------------------ LLaDA
def _guided(guide, adapter):
    """The guide's hooks for the run (a no-op context without a guide)."""
    return guide.attach(adapter) if guide is not None else contextlib.nullcontext()


@torch.no_grad()
def llada_generate(adapter: Adapter, prompt_ids, *, gen_length: int, steps: int, block_length: int | None = None,
                   remasking: str = "low_confidence", temperature: float = 0.0, cfg_scale: float = 0.0,
                   seed: int | None = None, callback: Callable | None = None, history: bool = False,
                   guide=None) -> Generation:
    """LLaDA's sampler: ``gen_length`` masks after each prompt, filled block by block (``block_length``,
    default one block); each block gets ``steps / num_blocks`` steps and commits, per step, the most confident
    masked positions of that block (``low_confidence``: probability of the chosen token; ``random``: uniform)
    in the counts of :func:`step_counts`. Tokens are the argmax (temperature 0) or Gumbel-max of the logits;
    ``cfg_scale > 0`` applies classifier-free guidance with the prompt masked in the unconditional copy.
    ``guide`` (e.g. :class:`dlmscope.analysis.order.SAEStabilityGuide`) re-ranks the confidence before the commit."""
    mask_id = adapter.require_mask_token()
    gen_length = _positive_int("gen_length", gen_length)
    ids, attention, gen_pos, lengths = _canvas(adapter, prompt_ids, gen_length, mask_id)
    given = torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]
    return _llada(adapter, ids, attention, gen_pos, lengths, given, steps=steps, block_length=block_length,
                  remasking=remasking, temperature=temperature, cfg_scale=cfg_scale, seed=seed, callback=callback,
                  history=history, guide=guide)


@torch.no_grad()
def llada_fill(adapter: Adapter, canvas_ids, *, steps: int, block_length: int | None = None,
               remasking: str = "low_confidence", temperature: float = 0.0, cfg_scale: float = 0.0,
               seed: int | None = None, callback: Callable | None = None, history: bool = False,
               guide=None) -> Generation:
    """:func:`llada_generate` on a given canvas: its ``[MASK]`` tokens (the same number in every row,
    anywhere in the row) are the positions generated, in blocks of ``block_length`` masks left to right; the
    other tokens are the prompt (masked in CFG's unconditional copy). ``prompt_lengths`` holds each row's
    first mask."""
    mask_id = adapter.require_mask_token()
    ids, attention, gen_pos, first = _fill_canvas(adapter, canvas_ids, mask_id)
    given = attention.bool() & (ids != mask_id)
    return _llada(adapter, ids, attention, gen_pos, first, given, steps=steps, block_length=block_length,
                  remasking=remasking, temperature=temperature, cfg_scale=cfg_scale, seed=seed, callback=callback,
                  history=history, guide=guide)


def _llada(adapter, ids, attention, gen_pos, lengths, given, *, steps, block_length, remasking, temperature,
           cfg_scale, seed, callback, history, guide) -> Generation:
    """LLaDA's loop over a prepared canvas; ``gen_pos`` ``[B, G]`` are the masked positions to fill."""
    mask_id = adapter.mask_token_id
    gen_length = gen_pos.shape[1]
    steps = _positive_int("steps", steps)
    block_length = gen_length if block_length is None else _positive_int("block_length", block_length)
    check_choice("remasking", remasking, REMASKING)
    if guide is not None and remasking != "low_confidence":
        raise ValueError(f"a guide re-ranks confidence; remasking={remasking!r} has none (use 'low_confidence')")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} is not a multiple of block_length={block_length}")
    n_blocks = gen_length // block_length
    if steps % n_blocks:
        raise ValueError(f"steps={steps} is not divisible by the number of blocks ({n_blocks} = gen_length / "
                         f"block_length)")
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature and cfg_scale must be >= 0, got {temperature}, {cfg_scale}")
    per_block = steps // n_blocks
    counts = step_counts(block_length, per_block)
    gen = _generator(seed, ids.device)
    block_of = torch.arange(gen_length, device=ids.device) // block_length      # [G]
    rec = _Recorder(ids, history, callback, steps, gen_pos, attention)
    with _guided(guide, adapter):
        for s in range(steps):
            block, i = divmod(s, per_block)
            masked_gen = ids.gather(1, gen_pos) == mask_id                           # [B, G]
            if cfg_scale > 0:
                uncond = torch.where(given, torch.full_like(ids, mask_id), ids)
                with publish_progress(Progress(s, steps, torch.cat([lengths, lengths]))):
                    both = adapter.logits(torch.cat([ids, uncond]), torch.cat([attention, attention]))
                cond, un = both.chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                with publish_progress(Progress(s, steps, lengths)):
                    logits = adapter.logits(ids, attention)
            gl = _at_generated(logits, gen_pos)                                   # [B, G, V]
            if temperature > 0:
                u = torch.rand(gl.shape, generator=gen, device=gl.device, dtype=torch.float64)
                gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
                x0 = (gl + (temperature * gumbel).to(gl.dtype)).argmax(-1)
            else:
                x0 = gl.argmax(-1)
            if remasking == "low_confidence":
                conf = gl.softmax(-1).gather(-1, x0[..., None])[..., 0]
            else:
                conf = torch.rand(x0.shape, generator=gen, device=gl.device)
            if guide is not None:
                conf = guide.rank(conf, gen_pos, masked_gen)
            conf = torch.where(masked_gen & (block_of == block), conf, torch.full_like(conf, -torch.inf))
            commit_gen = _top(conf, counts[i]) & masked_gen
            ids = rec.commit(s, ids, logits, commit_gen, x0, gen_pos, mask_id)
    return rec.result(ids, lengths)


# ------------------------------------------------------------------------------------------------ Dream
@torch.no_grad()
def dream_generate(adapter: Adapter, prompt_ids, *, max_new_tokens: int, steps: int, alg: str = "origin",
                   alg_temp: float | None = None, temperature: float = 0.0, top_p: float | None = None,
                   top_k: int | None = None, eps: float = 1e-3, seed: int | None = None,
                   callback: Callable | None = None, history: bool = False, guide=None,
                   schedule: str = "dream") -> Generation:
    """Dream's ``diffusion_generate``: ``max_new_tokens`` masks after each prompt, timesteps
    ``linspace(1, eps, steps + 1)``. ``origin`` reveals each mask with probability ``1 − s/t`` (all on the
    last step); the other algorithms commit :func:`dream_counts` tokens per step by confidence
    (``maskgit_plus``: the sampled token's probability, ``topk_margin``: p1 − p2, ``entropy``: Σ p log p), or
    sampled from ``softmax(confidence / alg_temp)`` when ``alg_temp > 0``. ``guide`` re-ranks the
    confidence before the commit (not with ``origin``, which has none). ``schedule="even"`` commits LLaDA's
    :func:`step_counts` instead (for comparisons at matched commits: Dream's own counts floor its first step to 0
    when ``steps`` equals the number of masks, e.g. ``[0, 1, …, 1, 2]``)."""
    mask_id = adapter.require_mask_token()
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    ids, attention, gen_pos, lengths = _canvas(adapter, prompt_ids, max_new_tokens, mask_id)
    return _dream(adapter, ids, attention, gen_pos, lengths, steps=steps, alg=alg, alg_temp=alg_temp,
                  temperature=temperature, top_p=top_p, top_k=top_k, eps=eps, seed=seed, callback=callback,
                  history=history, guide=guide, schedule=schedule)


@torch.no_grad()
def dream_fill(adapter: Adapter, canvas_ids, *, steps: int, alg: str = "origin", alg_temp: float | None = None,
               temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None, eps: float = 1e-3,
               seed: int | None = None, callback: Callable | None = None, history: bool = False,
               guide=None, schedule: str = "dream") -> Generation:
    """:func:`dream_generate` on a given canvas whose ``[MASK]`` tokens (the same number in every row) are
    the positions generated; ``prompt_lengths`` holds each row's first mask."""
    mask_id = adapter.require_mask_token()
    ids, attention, gen_pos, first = _fill_canvas(adapter, canvas_ids, mask_id)
    return _dream(adapter, ids, attention, gen_pos, first, steps=steps, alg=alg, alg_temp=alg_temp,
                  temperature=temperature, top_p=top_p, top_k=top_k, eps=eps, seed=seed, callback=callback,
                  history=history, guide=guide, schedule=schedule)


def _dream(adapter, ids, attention, gen_pos, lengths, *, steps, alg, alg_temp, temperature, top_p, top_k, eps,
           seed, callback, history, guide, schedule) -> Generation:
    """Dream's loop over a prepared canvas; ``gen_pos`` ``[B, G]`` are the masked positions to fill."""
    mask_id = adapter.mask_token_id
    steps = _positive_int("steps", steps)
    check_choice("alg", alg, DREAM_ALGS)
    check_choice("schedule", schedule, DREAM_SCHEDULES)
    if schedule == "even" and alg == "origin":
        raise ValueError("schedule='even' sets how many tokens each step commits; alg='origin' reveals at random")
    if guide is not None and alg == "origin":
        raise ValueError("a guide re-ranks confidence; alg='origin' reveals at random and has none")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    gen = _generator(seed, ids.device)
    ts = torch.linspace(1, eps, steps + 1)
    G = gen_pos.shape[1]
    counts = dream_counts(G, steps, eps) if schedule == "dream" else step_counts(G, steps)
    rec = _Recorder(ids, history, callback, steps, gen_pos, attention)
    with _guided(guide, adapter):
        for s in range(steps):
            masked_gen = ids.gather(1, gen_pos) == mask_id
            with publish_progress(Progress(s, steps, lengths)):
                logits = adapter.logits(ids, attention)
            gl = _at_generated(logits, gen_pos)
            x0, conf = dream_tokens(gl, alg, temperature, top_p, top_k, gen)
            if alg == "origin":
                p = 1.0 if s == steps - 1 else float(1 - ts[s + 1] / ts[s])
                commit_gen = masked_gen & (torch.rand(masked_gen.shape, generator=gen, device=ids.device) < p)
            else:
                if guide is not None:
                    conf = guide.rank(conf, gen_pos, masked_gen)
                conf = torch.where(masked_gen, conf, torch.full_like(conf, -torch.inf))
                if alg_temp and counts[s] > 0:
                    weights = (conf / alg_temp).softmax(-1)
                    pick = torch.multinomial(weights, counts[s], generator=gen)
                    commit_gen = torch.zeros_like(masked_gen).scatter_(1, pick, True) & masked_gen
                else:
                    commit_gen = _top(conf, counts[s]) & masked_gen
            ids = rec.commit(s, ids, logits, commit_gen, x0, gen_pos, mask_id)
    return rec.result(ids, lengths)


# ------------------------------------------------------------------------------------------------ AR
@torch.no_grad()
def ar_generate(adapter: Adapter, prompt_ids, *, max_new_tokens: int, temperature: float = 0.0,
                top_p: float | None = None, seed: int | None = None, callback: Callable | None = None) -> Generation:
    """Left-to-right generation with transformers' ``generate`` (greedy at temperature 0), no early stop, so
    every row gets ``max_new_tokens``; the output is left-aligned like the diffusion samplers'. The callback
    sees each step's next-token scores (``state.logits`` ``[B, V]``) and the position about to be written."""
    from transformers import LogitsProcessor, LogitsProcessorList

    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    if adapter.is_diffusion:
        raise ValueError(f"ar_generate needs an autoregressive model; {adapter.family!r} is a diffusion LM "
                         "(use llada_generate or dream_generate)")
    ids, attention, gen_pos, lengths = _canvas(adapter, prompt_ids, max_new_tokens, 0)
    B, T = ids.shape
    P = T - max_new_tokens
    pad_id = _pad_id(adapter)
    # transformers generates after left-padded prompts; shift each row right by its padding
    pad = P - lengths
    src = (torch.arange(P, device=ids.device) - pad[:, None]).clamp(min=0)
    left_att = (torch.arange(P, device=ids.device) >= pad[:, None]).long()
    left = torch.where(left_att.bool(), ids[:, :P].gather(1, src), torch.full_like(ids[:, :P], pad_id))

    # the prompt lengths as the model sees them inside generate (left-padded rows): P for every row
    seen = torch.full_like(lengths, P)

    class _Watch(LogitsProcessor):
        def __call__(self, input_ids, scores):
            s = input_ids.shape[1] - P
            _PROGRESS.set(Progress(s + 1, max_new_tokens, seen, causal=True))     # the next forward is step s + 1
            if callback is None:
                return scores
            cur = ids.clone()
            cur.scatter_(1, gen_pos[:, :s], input_ids[:, P:P + s])
            commit = _to_canvas(torch.arange(max_new_tokens, device=ids.device)[None].expand(B, -1) == s,
                                gen_pos, T)
            callback(SamplerState(s, max_new_tokens, cur, torch.zeros_like(commit), scores.clone(), commit))
            return scores

    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=temperature > 0,
              pad_token_id=pad_id)
    if temperature > 0:
        kw.update(temperature=temperature, top_p=1.0 if top_p is None else top_p, top_k=0)
    kw["logits_processor"] = LogitsProcessorList([_Watch()])
    with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []), \
            publish_progress(Progress(0, max_new_tokens, seen, causal=True)):
        torch.manual_seed(0 if seed is None else int(seed))
        out = adapter.model.generate(input_ids=left, attention_mask=left_att, **kw)
    new = out[:, P:P + max_new_tokens]
    ids.scatter_(1, gen_pos, new)
    return Generation(ids, lengths, gen_positions=gen_pos, attention_mask=attention)
