"""The plain-PyTorch side of every benchmark comparison, in one module: what the paper's code (or the obvious loop)
does, timed against dlmscope's path in the same run. dlmscope's side of each comparison is in :mod:`workloads`,
:mod:`harvest_train` and the suites themselves.

- training step (``bench_train_step.py``): :func:`build_step` — ``dense`` is ``reference.dense_train_step``:
  ``reference.topk_encode`` (B×n pre-activations + ``torch.topk``) + ``reference.sparse_decode`` (scatter into B×n,
  dense matmul), MSE, autograd, W_dec gradient projected off the unit rows, ``torch.optim.Adam`` (foreach) on all
  parameters, W_dec rows renormalised; ``dense_compiled`` the same with its two halves under ``torch.compile``.
- ops (``bench_ops.py``): :func:`build_op` — ``reference``: the op of ``dlmscope.reference``; ``adam_foreach``: the
  decoder update the dense step does (project, ``torch.optim.Adam`` foreach, renormalise).
- k sweep (``bench_sweep_training.py``): :class:`DenseSweep` — per SAE its own Adam and the dense step.
- harvest + train (``bench_harvest_train.py``, ``report.py pipeline``): :func:`run_plain` — full forwards with
  hooks (the model re-run per layer, or one forward for all layers), a shuffle buffer and :class:`PlainSweep`
  (the dense step with dlmscope Trainer's recipe: norm factor, geometric-median ``b_dec``, lr schedule, clipping).
- feature statistics (``bench_feature_stats.py``): :func:`plain_feature_stats` — a heap per latent, a window built
  for every firing.
- replay (``bench_replay.py``): :func:`per_step_replay` — one truncated forward per recorded state (and per layer).
"""
from __future__ import annotations

import heapq
import time
import types
from collections.abc import Iterable, Iterator

import torch

import workloads
from dlmscope import reference
from dlmscope.analysis.order import top_latents
from dlmscope.data.noise import corrupt, draw_t
from dlmscope.data.shuffle import shuffle_batches
from dlmscope.sae.topk import TopKSAE
from dlmscope.train.geometric_median import geometric_median
from dlmscope.train.schedule import lr_factor
from workloads import BETAS, EPS, LR, BenchConfig, Rotation, Workload

#: the baseline variants of the step and op groups (the other variants: :mod:`workloads`)
STEP_VARIANTS = ("dense", "dense_compiled")
OP_VARIANTS = ("reference", "adam_foreach")


# ---- training step and ops --------------------------------------------------------------------------------------


def dense_step(compiled: bool = False):
    """The paper's plain-PyTorch step ``(sae, opt, x, grad_clip) -> loss``: ``reference.dense_train_step``, or its
    two halves (``reference.dense_loss``, ``reference.dense_update``) under ``torch.compile``."""
    if not compiled:
        return reference.dense_train_step
    loss_fn, update_fn = torch.compile(reference.dense_loss), torch.compile(reference.dense_update)

    def step(sae, opt, x, grad_clip):  # reference.dense_train_step, its two halves compiled
        loss = loss_fn(sae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update_fn(sae, opt, grad_clip)
        return loss.detach()

    return step


def build_step(cfg: BenchConfig, variant: str) -> Workload:
    """``dense`` / ``dense_compiled``: the dense step without clipping (the backend steps do not clip either)."""
    if variant not in STEP_VARIANTS:
        raise ValueError(f"unknown baseline step {variant!r}; one of {STEP_VARIANTS}")
    compiled = variant == "dense_compiled"
    p = workloads.make_params(cfg)
    sae = types.SimpleNamespace(**p, k=cfg.k)  # what the reference step reads: W_enc, b_enc, W_dec, b_dec, k
    opt, mode = workloads.adam(list(p.values()), fused=False)  # the default: foreach
    step = dense_step(compiled)
    state = {"sae": sae, "opt": opt, "xs": Rotation(workloads.make_batches(cfg))}

    def fn():
        return step(state["sae"], state["opt"], state["xs"].next(), None)

    return Workload(variant, fn, state, {"kind": "step", "adam": mode, "compiled": compiled})


def build_op(cfg: BenchConfig, op: str, variant: str) -> Workload:
    """``reference``: ``op`` of ``dlmscope.reference``; ``adam_foreach`` (``decoder_norm_step`` only): project,
    ``torch.optim.Adam`` (foreach), renormalise. Same inputs as every backend (:func:`workloads.op_inputs`)."""
    state = workloads.op_inputs(cfg, op)
    k = cfg.k
    info = {"kind": "op", "op": op}

    if (op, variant) == ("encode", "reference"):
        @torch.no_grad()
        def fn():
            P = state["p"]
            return reference.topk_encode(state["xs"].next(), P["W_enc"], P["b_enc"], P["b_dec"], k)
    elif (op, variant) == ("decode_fwd_bwd", "reference"):
        def fn():
            values, indices, grad_out = state["codes"].next()
            values = values.detach().requires_grad_(True)
            x_hat = reference.sparse_decode(values, indices, state["W_dec"], state["b_dec"])
            return torch.autograd.grad(x_hat, (values, state["W_dec"], state["b_dec"]), grad_out)
    elif (op, variant) == ("decoder_norm_step", "reference"):
        def fn():
            state["step"] += 1
            reference.decoder_norm_step(state["W"], state["grads"].next(), state["m"], state["v"], state["step"],
                                        LR, BETAS, EPS)
    elif (op, variant) == ("decoder_norm_step", "adam_foreach"):
        # what the dense step does for the decoder: project, torch.optim.Adam (foreach), renormalise
        Wp = torch.nn.Parameter(state["W"])
        state.update(Wp=Wp, opt=torch.optim.Adam([Wp], lr=LR, betas=BETAS, eps=EPS, foreach=True))

        def fn():
            Wp = state["Wp"]
            with torch.no_grad():
                Wp.grad = reference.project_out_parallel(state["grads"].next(), Wp)
            state["opt"].step()
            with torch.no_grad():
                Wp.copy_(reference.normalize_rows(Wp))
    else:
        raise ValueError(f"no baseline {variant!r} for op {op!r}")
    return Workload(f"{op}/{variant}", fn, state, info)


# ---- k sweep --------------------------------------------------------------------------------------------------


class DenseSweep:
    """A k sweep trained the paper's code's way: per SAE its own ``torch.optim.Adam`` and the dense step
    (B×n pre-activations, scatter + dense decode, gradient projection, clipping, Adam, renormalise), every SAE on
    every batch."""

    def __init__(self, saes: list[TopKSAE], lr: float = 3e-4, grad_clip: float = 1.0):
        self.states = [(sae, torch.optim.Adam([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], lr=lr)) for sae in saes]
        self.grad_clip = grad_clip

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        for x in batches:
            for sae, opt in self.states:
                reference.dense_train_step(sae, opt, x, self.grad_clip)


# ---- harvest + train pipeline ---------------------------------------------------------------------------------
# ``s`` is a ``harvest_train.Settings`` (layers, tokens, batch_size, buffer_tokens, lr, schedule, t_min/t_max, seed).


def plain_corrupt(ids: torch.Tensor, mask_id: int, s, gen: torch.Generator):
    """docs/reference.md §3: p ~ U[t_min, t_max] per batch, mask positions except 0 w.p. p (the world rows have no
    padding). ``noise.corrupt`` is plain torch (no fused op); drawing p first, as ``harvest`` does, keeps
    the same positions on both sides."""
    return corrupt(ids, None, mask_id, draw_t(s.t_min, s.t_max, gen), gen)


@torch.no_grad()
def plain_harvest(adapter, batches: Iterable[torch.Tensor], layers: Iterable[int], s
                  ) -> Iterator[dict[int, torch.Tensor]]:
    """Kept (masked-position) activations ``{layer: [m, d]}`` per LM batch, from FULL forwards with hooks."""
    layers = list(layers)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(L):
        def hook(_module, _args, output):
            captured[L] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [adapter.hook_module(L).register_forward_hook(make_hook(L)) for L in layers]
    gen = torch.Generator().manual_seed(s.seed)
    mask_id = adapter.mask_token_id
    produced = 0
    try:
        for ids in batches:
            noisy, keep = plain_corrupt(ids, mask_id, s, gen)
            adapter.model(input_ids=noisy, use_cache=False)  # every block, final norm and LM head
            flat = keep.reshape(-1)
            chunk = {L: captured[L].reshape(-1, captured[L].shape[-1])[flat] for L in layers}
            captured.clear()
            m = int(flat.sum())
            if produced + m >= s.tokens:
                yield {L: v[: s.tokens - produced] for L, v in chunk.items()}
                return
            produced += m
            yield chunk
    finally:
        for h in handles:
            h.remove()
    raise ValueError(f"the corpus ran out after {produced} kept tokens (< {s.tokens}); raise --sentences")


def plain_shuffle(chunks: Iterable[dict[int, torch.Tensor]], s) -> Iterator[dict[int, torch.Tensor]]:
    """The shuffle buffer: ``dlmscope.data.shuffle.shuffle_batches`` is plain torch (cat / randperm / slicing), so
    the baseline uses it as is (an ad-hoc buffer that re-concatenates per chunk would only handicap the baseline)."""
    return shuffle_batches(chunks, s.batch_size, s.buffer_tokens, seed=s.seed + 1)


class PlainSweep:
    """The k sweep of one layer trained with plain PyTorch (dense Top-K), the paper's recipe."""

    def __init__(self, saes: list[TopKSAE], s):
        self.saes, self.s = saes, s
        self.opts = []
        for sae in saes:
            opt = torch.optim.Adam([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], lr=s.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: lr_factor(step, s.steps, s.warmup_steps, s.decay_fraction))
            self.opts.append((opt, sched))
        self.pending: list[torch.Tensor] = []
        self.norm: float | None = None
        self.tokens_seen = 0

    def push(self, x: torch.Tensor) -> None:
        if self.norm is None:
            self.pending.append(x)
            if len(self.pending) >= min(self.s.norm_batches, self.s.steps):
                self._start()
            return
        self._step(x)

    def _start(self) -> None:
        self.norm = float(torch.cat(self.pending).double().pow(2).sum(-1).mean().sqrt())
        with torch.no_grad():
            median = geometric_median(self.pending[0] / self.norm)
            for sae in self.saes:
                sae.b_dec.copy_(median)
        pending, self.pending = self.pending, []
        for x in pending:
            self._step(x)

    def _step(self, x: torch.Tensor) -> None:
        x = x / self.norm
        for sae, (opt, sched) in zip(self.saes, self.opts):
            reference.dense_train_step(sae, opt, x, self.s.grad_clip)
            sched.step()
        self.tokens_seen += x.shape[0]

    @torch.no_grad()
    def finish(self) -> None:
        if self.norm is None:
            self._start()
        for sae in self.saes:  # fold the norm factor into the biases: the SAEs run on raw activations
            sae.b_enc.mul_(self.norm)
            sae.b_dec.mul_(self.norm)


def run_plain(adapter, batches: list[torch.Tensor], s, saes: dict[int, list[TopKSAE]],
              one_forward: bool = False) -> dict:
    """The plain-PyTorch pipeline: per layer a full-forward harvest (or one for all layers) + dense training."""
    layer_s = {}
    groups = [list(s.layers)] if one_forward else [[L] for L in s.layers]
    for layers in groups:
        t0 = time.perf_counter()
        sweeps = {L: PlainSweep(saes[L], s) for L in layers}
        for step, batch in enumerate(plain_shuffle(plain_harvest(adapter, batches, layers, s), s)):
            if step == s.steps:
                break
            for L in layers:
                sweeps[L].push(batch[L])
        for L, sweep in sweeps.items():
            sweep.finish()
            if sweep.tokens_seen != s.tokens:
                raise RuntimeError(f"plain layer {L} trained on {sweep.tokens_seen} tokens, not {s.tokens}")
        layer_s["+".join(map(str, layers))] = time.perf_counter() - t0
    return {"per_layer_s": layer_s}


# ---- interpretation -------------------------------------------------------------------------------------------


def plain_feature_stats(sae, batches, top: int, half: int):
    """Per latent a heap of its ``top`` largest firings with their ±``half``-token windows, and the firing counts:
    a Python loop over every firing (no importance samples, no histogram: less than ``interp.features.collect``
    keeps). ``batches``: ``(acts, ids, keep, _)`` as ``interp.features.model_batches`` yields them."""
    heaps = [[] for _ in range(sae.n)]
    fired = [0] * sae.n
    counter = 0
    for acts, ids, keep, _ in batches:
        with torch.no_grad():
            values, indices = sae.encode(acts)
        values, indices, ids_l = values.tolist(), indices.tolist(), ids.tolist()
        keep_l = keep.tolist()
        for b, row in enumerate(values):
            for t, (vals, lats) in enumerate(zip(row, indices[b])):
                if not keep_l[b][t]:
                    continue
                for v, f in zip(vals, lats):
                    if v <= 0:
                        continue
                    fired[f] += 1
                    counter += 1
                    window = ids_l[b][max(0, t - half):t + half + 1]
                    item = (v, counter, window)
                    if len(heaps[f]) < top:
                        heapq.heappush(heaps[f], item)
                    elif v > heaps[f][0][0]:
                        heapq.heapreplace(heaps[f], item)
    return heaps, fired


@torch.no_grad()
def per_step_replay(dlm, gen, saes: dict, per_layer: bool, top_k: int = 8):
    """A decoding history replayed the plain way: one truncated forward per recorded state with every layer of
    ``saes`` hooked (``per_layer``: one forward per state and layer), each layer's top-``top_k`` latents at the
    generated positions."""
    out = []
    for s in range(gen.history.shape[0]):
        groups = [[L] for L in saes] if per_layer else [list(saes)]
        for layers in groups:
            hs = dlm.forward_until(gen.history[s], layers, attention_mask=gen.attention_mask)
            for L in layers:
                h = hs[L].gather(1, gen.gen_positions[..., None].expand(-1, -1, hs[L].shape[-1]))
                out.append(top_latents(saes[L], h, top_k))
    return out
