"""Train the embedded world's five tiny models and write them in their real checkpoint formats.

``out_dir/models/dlm/``       LLaDA-format masked diffusion LM (``model_type: "llada"``, LLaDA key names),
                              trained with the masked-diffusion objective: per sequence ``t ~ U(eps, 1)``,
                              every position except 0 replaced by ``[MASK]`` with probability ``t``,
                              ``loss = Σ_masked CE / t / #tokens`` (LLaDA's 1/t-weighted ELBO).
``out_dir/models/ar/``        the AR twin: the same architecture with causal attention, next-token CE on the
                              same packed corpus and budget, saved as a plain transformers Llama checkpoint.
``out_dir/models/ar_matched/`` the budget-matched AR twin: the AR twin continued with next-token CE for the
                              DLM's own steps on the DLM's own data (the pre-training corpus, then the annealing
                              mix), so that both have seen the same rows x tokens of the same data; Llama format.
``out_dir/models/instruct/``  the DLM fine-tuned on the Q&A slice (LLaDA-style SFT: the prompt is never
                              masked, only answer / ``[EOS]`` positions are), with base-corpus sentences mixed
                              in so it keeps the base facts (whole sentence maskable, except the base corpus's own
                              Q&A-kind sentences, about a tenth, whose prompt stays visible too); LLaDA format.
``out_dir/models/placebo/``   the placebo twin: the instruct twin's fine-tuning (same code, steps, rows, seeds)
                              on base-corpus sentences only, none of the Q&A kind: the null for model diffing
                              (what fine-tuning alone changes); LLaDA format.

The AR twin trains first; the DLM starts from its weights (as Dream-7B starts from Qwen2.5), trains 4x
longer with the LLaDA objective and ends with an annealing phase on a task-rich mix (as LLaDA's last
pre-training tokens): masked diffusion learns a fact from a sentence only when the answer is masked and its
cues are not, so it needs more training per token to know what the AR twin knows.

Each directory also holds the world's tokenizer files, so ``dlmscope.models.load(dir)`` and
``AutoTokenizer.from_pretrained(dir)`` work. Training is deterministic on one machine (fixed seeds, fixed
thread count, ``torch.use_deterministic_algorithms``); :func:`evaluate_models` computes the quality numbers
stored in ``world.json["models"]``, among them exact match per decoding-task kind (:mod:`.quality`).
"""
from __future__ import annotations

import itertools
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from dlmscope.models import load as load_model
from dlmscope.models.llada import save_llada_checkpoint
from . import corpus as C
from .evaluation import (ar_perplexity, evaluate_models, masked_accuracy, qa_accuracy, quality_summary,
                         unigram_counts)
from .objectives import ar_loss, diffusion_mask, dlm_loss, is_causal, stratified_t
from .quality import task_quality
from .tokenizer import save_tokenizer

__all__ = ["ModelConfig", "TrainConfig", "train_models", "evaluate_models", "masked_accuracy", "ar_perplexity",
           "qa_accuracy", "unigram_counts", "MIN_PRETRAIN", "stratified_t", "anneal_dlm", "sft_samples",
           "quality_summary",
           "train_ar_matched", "train_instruct", "training_record"]

#: Worlds smaller than this many pre-training sentences get no models (a model trained on a toy slice would
#: be meaningless, and the corpus-only build tests stay fast).
MIN_PRETRAIN = 50_000


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 8
    n_heads: int = 4
    mlp_hidden: int = 384
    max_len: int = 128
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    threads: int = 2
    seq_len: int = 64
    batch: int = 64
    #: the masked DLM's steps and the AR twin's (rows of ``batch`` x ``seq_len`` tokens)
    dlm_steps: int = 4500
    ar_steps: int = 1200
    lr: float = 3e-3
    warmup: int = 200
    weight_decay: float = 0.01
    clip: float = 1.0
    t_eps: float = 1e-3
    #: instruct fine-tuning
    sft_steps: int = 600
    sft_lr: float = 1e-3
    sft_batch: int = 64
    sft_seq_len: int = 32
    #: fraction of the fine-tuning rows that are base-corpus sentences (against forgetting)
    sft_base_frac: float = 0.5
    #: also train the placebo twin (``models/placebo``: the instruct twin's fine-tuning on base sentences only)
    placebo: bool = True
    #: the DLM starts from the trained AR twin's weights ("ar") or from scratch ("scratch")
    dlm_init: str = "ar"
    #: the DLM's annealing phase (as LLaDA's last pre-training tokens): a fresh optimiser, the task-rich
    #: ``anneal`` corpus, and half of every batch at low mask rates ``t < anneal_low_t``, where a long
    #: question or a chain keeps the several cue words its answer needs
    anneal_steps: int = 1000
    anneal_lr: float = 1e-3
    anneal_warmup: int = 50
    anneal_low_t: float = 0.3
    #: also train the budget-matched AR twin (``models/ar_matched``)
    ar_matched: bool = True
    #: log in-distribution exact match on the first scored tasks every this many steps (0: never)
    probe_every: int = 500
    probe_tasks: int = 240
    #: evaluation
    eval_rows: int = 256
    eval_mask_rates: tuple = (0.15, 0.5, 0.9)


def llama_config(tok, mc: ModelConfig, causal: bool):
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(tok), hidden_size=mc.d_model, intermediate_size=mc.mlp_hidden,
              num_hidden_layers=mc.n_layers, num_attention_heads=mc.n_heads, num_key_value_heads=mc.n_heads,
              hidden_act="silu", max_position_embeddings=mc.max_len, rms_norm_eps=1e-5, rope_theta=mc.rope_theta,
              tie_word_embeddings=False, attention_bias=False, mlp_bias=False, use_cache=False,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if not causal:
        kw.update(is_causal=False, mask_token_id=tok.mask_token_id)
    return LlamaConfig(**kw)


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _optimizer(model, lr, wd):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-8, foreach=False)


def _batches(n_rows: int, batch: int, steps: int, gen: torch.Generator):
    """Row indices for ``steps`` batches: reshuffled epochs, deterministic under ``gen``."""
    perm, pos = torch.randperm(n_rows, generator=gen), 0
    for _ in range(steps):
        if pos + batch > n_rows:
            perm, pos = torch.randperm(n_rows, generator=gen), 0
        yield perm[pos:pos + batch]
        pos += batch


def _train_loop(model, opt, steps, lr, warmup, clip, step_fn, log, name, log_every=100, probe=None,
                probe_every=0):
    """AdamW steps of ``step_fn`` under the warmup + cosine schedule; every ``probe_every`` steps logs
    ``probe(model)`` (a quality line) too."""
    model.train()
    t0, run = time.perf_counter(), 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _schedule(step, steps, warmup)
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        run = loss.item() if step == 0 else 0.95 * run + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"[world] {name} step {step + 1}/{steps} loss {run:.3f} ({time.perf_counter() - t0:.0f}s)")
        if probe is not None and probe_every and ((step + 1) % probe_every == 0 or step + 1 == steps):
            model.eval()
            log(f"[world] {name} step {step + 1}: {probe(model)}")
            model.train()
    model.eval()
    return time.perf_counter() - t0


def train_dlm(train_ids, tok, mc: ModelConfig, tc: TrainConfig, log=print, init=None, probe=None):
    """The masked DLM, from ``init``'s weights when given (the AR twin: same shapes, causal mask dropped,
    as Dream-7B starts from Qwen2.5; LLaDA's no-shift alignment is learnt here) or from scratch."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(tc.seed)
    model = LlamaForCausalLM(llama_config(tok, mc, causal=False))
    if init is not None:
        model.load_state_dict(init.state_dict())
    opt = _optimizer(model, tc.lr, tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed + 10)
    batches = _batches(train_ids.shape[0], tc.batch, tc.dlm_steps, gen)

    def step_fn(_):
        ids = train_ids[next(batches)]
        t = stratified_t(ids.shape[0], tc.t_eps, gen)
        noisy, masked = diffusion_mask(ids, t, gen, tok.mask_token_id, tok.pad_token_id)
        return dlm_loss(model, ids, t, masked, noisy)

    secs = _train_loop(model, opt, tc.dlm_steps, tc.lr, tc.warmup, tc.clip, step_fn, log, "dlm", probe=probe,
                       probe_every=tc.probe_every)
    return model, secs


def train_ar(train_ids, tok, mc: ModelConfig, tc: TrainConfig, log=print, probe=None):
    from transformers import LlamaForCausalLM

    torch.manual_seed(tc.seed + 1)
    model = LlamaForCausalLM(llama_config(tok, mc, causal=True))
    opt = _optimizer(model, tc.lr, tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed + 11)
    batches = _batches(train_ids.shape[0], tc.batch, tc.ar_steps, gen)

    def step_fn(_):
        return ar_loss(model, train_ids[next(batches)])

    secs = _train_loop(model, opt, tc.ar_steps, tc.lr, tc.warmup, tc.clip, step_fn, log, "ar", probe=probe,
                       probe_every=tc.probe_every)
    return model, secs


def anneal_dlm(model, anneal_ids, tok, tc: TrainConfig, log=print, probe=None):
    """The DLM's annealing phase, in place: ``tc.anneal_steps`` steps of the same 1/t-weighted loss on
    ``anneal_ids``; one half of each batch draws ``t`` from ``[eps, 1)``, the other from
    ``[eps, anneal_low_t)`` (both stratified)."""
    torch.manual_seed(tc.seed + 3)
    opt = _optimizer(model, tc.anneal_lr, tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed + 13)
    batches = _batches(anneal_ids.shape[0], tc.batch, tc.anneal_steps, gen)
    low = tc.batch // 2

    def step_fn(_):
        ids = anneal_ids[next(batches)]
        t = torch.cat([stratified_t(ids.shape[0] - low, tc.t_eps, gen), tc.anneal_low_t * stratified_t(low, tc.t_eps, gen)])
        noisy, masked = diffusion_mask(ids, t, gen, tok.mask_token_id, tok.pad_token_id)
        return dlm_loss(model, ids, t, masked, noisy)

    secs = _train_loop(model, opt, tc.anneal_steps, tc.anneal_lr, tc.anneal_warmup, tc.clip, step_fn, log,
                       "dlm anneal", probe=probe, probe_every=tc.probe_every)
    return model, secs


def train_ar_matched(ar, train_ids, anneal_ids, tok, tc: TrainConfig, log=print, probe=None):
    """The budget-matched AR twin: a copy of the trained AR twin continued with next-token CE for the DLM's
    ``dlm_steps`` on ``train_ids`` (the DLM's learning rate and schedule), then its ``anneal_steps`` on
    ``anneal_ids`` (the annealing phase's learning rate and schedule), each phase with a fresh optimiser as the
    DLM's. Total steps, rows and tokens then equal the DLM's (which starts from the same AR twin)."""
    import copy

    torch.manual_seed(tc.seed + 4)
    model = copy.deepcopy(ar)
    gen = torch.Generator().manual_seed(tc.seed + 14)
    secs = 0.0
    for ids_all, steps, lr, warmup, name in ((train_ids, tc.dlm_steps, tc.lr, tc.warmup, "ar_matched"),
                                             (anneal_ids, tc.anneal_steps, tc.anneal_lr, tc.anneal_warmup,
                                              "ar_matched anneal")):
        if not steps:
            continue
        opt = _optimizer(model, lr, tc.weight_decay)
        batches = _batches(ids_all.shape[0], tc.batch, steps, gen)

        def step_fn(_, ids_all=ids_all, batches=batches):
            return ar_loss(model, ids_all[next(batches)])

        secs += _train_loop(model, opt, steps, lr, warmup, tc.clip, step_fn, log, name, probe=probe,
                            probe_every=tc.probe_every)
    return model, secs


def training_record(tc: TrainConfig) -> dict:
    """What each model was trained on: per model its phases (``steps``, ``rows``, ``tokens`` = steps x batch x
    seq_len, ``data``, ``objective``, ``init``) and the totals; stored as ``world.json["models"]["training"]``."""
    def phase(steps, data, objective, batch=tc.batch, length=tc.seq_len):
        return {"steps": steps, "rows": steps * batch, "tokens": steps * batch * length, "data": data,
                "objective": objective}

    ar = [phase(tc.ar_steps, "pretrain corpus", "next-token CE")]
    dlm = ar + [phase(tc.dlm_steps, "pretrain corpus", "masked diffusion (1/t ELBO)")]
    if tc.anneal_steps:
        dlm.append(phase(tc.anneal_steps, "anneal mix (task-rich)", "masked diffusion, half of each batch t < "
                         f"{tc.anneal_low_t}"))
    rec = {"ar": {"init": "random", "phases": ar},
           "dlm": {"init": "random, then the AR twin's phase" if tc.dlm_init == "ar" else "random",
                   "phases": dlm if tc.dlm_init == "ar" else dlm[1:]},
           "instruct": {"init": "the DLM", "phases": [phase(tc.sft_steps, "Q&A + base sentences 1:1",
                                                            "LLaDA SFT (prompt never masked)",
                                                            tc.sft_batch, tc.sft_seq_len)]}}
    if tc.placebo:
        rec["placebo"] = {"init": "the DLM", "phases": [phase(tc.sft_steps, "base sentences only (placebo)",
                                                              "LLaDA SFT (prompt never masked)",
                                                              tc.sft_batch, tc.sft_seq_len)]}
    if tc.ar_matched:
        rec["ar_matched"] = {"init": "the AR twin", "phases": ar + [
            phase(tc.dlm_steps, "pretrain corpus", "next-token CE")]
            + ([phase(tc.anneal_steps, "anneal mix (task-rich)", "next-token CE")] if tc.anneal_steps else [])}
    for r in rec.values():
        r["total"] = {k: sum(p[k] for p in r["phases"]) for k in ("steps", "rows", "tokens")}
    return rec


def train_instruct(base_model, qa_ids, qa_prompt, tok, tc: TrainConfig, log=print, name="instruct"):
    """LLaDA-style SFT of a copy of ``base_model``: prompt positions never masked; answer + [EOS] positions
    masked with probability ``t``; loss normalised by the answer length. Rows without a prompt (base-corpus
    sentences mixed in) have only ``[BOS]`` as prompt. The placebo twin is this with base sentences only
    (``name`` labels the log lines)."""
    import copy

    torch.manual_seed(tc.seed + 2)
    model = copy.deepcopy(base_model)
    opt = _optimizer(model, tc.sft_lr, tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed + 12)
    batches = _batches(qa_ids.shape[0], tc.sft_batch, tc.sft_steps, gen)

    def step_fn(_):
        rows = next(batches)
        ids, prompt = qa_ids[rows], qa_prompt[rows]
        att = (ids != tok.pad_token_id).long()
        answer = ~prompt & (ids != tok.pad_token_id)
        t = stratified_t(ids.shape[0], tc.t_eps, gen)
        noisy, masked = diffusion_mask(ids, t, gen, tok.mask_token_id, tok.pad_token_id, maskable=answer)
        return dlm_loss(model, ids, t, masked, noisy, attention_mask=att, norm=answer.sum(1).clamp(min=1))

    secs = _train_loop(model, opt, tc.sft_steps, tc.sft_lr, min(tc.warmup, tc.sft_steps // 10), tc.clip, step_fn,
                       log, name, log_every=50)
    return model, secs


def sft_samples(world, frac_base: float, seq_len: int, seed: int, placebo: bool = False) -> list:
    """The instruct twin's fine-tuning samples: the Q&A training slice plus base-corpus sentences (a fraction
    ``frac_base`` of the total, those that fit ``seq_len`` tokens), shuffled with ``random.Random(seed)``.
    ``placebo``: as many rows, all base-corpus sentences that fit and are not of the Q&A kind."""
    qa = list(world.instruct_train)
    n_base = round(len(qa) * frac_base / (1 - frac_base)) if frac_base < 1 else 0
    fits = (s for s in world.train if len(s.words) + 2 <= seq_len and not (placebo and s.kind == "qa"))
    if placebo:
        mixed = list(itertools.islice(fits, len(qa) + n_base))
        if len(mixed) < len(qa) + n_base:
            raise ValueError(f"placebo: {len(mixed)} base sentences fit {seq_len} tokens, "
                             f"the instruct mix has {len(qa) + n_base} rows")
    else:
        mixed = qa + list(itertools.islice(fits, n_base))
    random.Random(seed).shuffle(mixed)
    return mixed


# ------------------------------------------------------------------------------------------------ entry point
def save_model(model, tok, models_dir: str, name: str) -> None:
    """Write one checkpoint (+ tokenizer files) to ``models_dir/name``: transformers Llama format for a causal
    model (the AR twins), LLaDA format for a diffusion one (the DLM, the instruct and placebo twins)."""
    d = os.path.join(models_dir, name)
    os.makedirs(d, exist_ok=True)
    if is_causal(model):
        model.save_pretrained(d, safe_serialization=True)
    else:
        save_llada_checkpoint(model, d, mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    save_tokenizer(tok, d)


def _reused(models_dir: str, name: str, reuse: bool, log):
    """The checkpoint ``models_dir/name`` as a training-side model when ``reuse`` and it exists, else None."""
    d = os.path.join(models_dir, name)
    if not (reuse and os.path.isfile(os.path.join(d, "model.safetensors"))):
        return None
    log(f"[world] {name}: reusing {d}")
    return load_model(d).model.eval()


def train_models(world, tokenizer, out_dir: str, log=print, mc: ModelConfig = ModelConfig(),
                 tc: TrainConfig | None = None, reuse: bool = False) -> dict:
    """Train the DLM, its AR twins and the instruct and placebo twins; write them under
    ``out_dir/models/{dlm,ar,ar_matched,instruct,placebo}`` and return the metrics (stored as ``world.json["models"]``).
    ``reuse``: load a model whose checkpoint is already in ``out_dir`` instead of training it again (training is
    deterministic, so a reused checkpoint of the same recipe equals a retrained one)."""
    tc = tc or TrainConfig(seed=world.config.seed, seq_len=world.config.seq_len)
    if world.config.n_pretrain < MIN_PRETRAIN:
        log(f"[world] models: skipped (n_pretrain {world.config.n_pretrain} < {MIN_PRETRAIN})")
        return {"skipped": f"n_pretrain < {MIN_PRETRAIN}"}
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(tc.threads)
    torch.use_deterministic_algorithms(True)
    # denormal floats can slow CPU training by 10x+ once weights/gradients get tiny
    torch.set_flush_denormal(True)
    try:
        t0 = time.perf_counter()
        train_ids = C.pack(world.train, tokenizer, tc.seq_len)
        log(f"[world] models: {train_ids.shape[0]} packed rows of {tc.seq_len} tokens "
            f"({train_ids.numel()} tokens); dlm {tc.dlm_steps} / ar {tc.ar_steps} steps x {tc.batch} rows")
        models_dir, sizes = os.path.join(out_dir, "models"), {}
        probe_tasks = [t for t in world.tasks if t.kind in C.SCORED_KINDS][:tc.probe_tasks]
        probe_held = [C.task_heldout(t, world.config.heldout_frac, world.config.seed) for t in probe_tasks]

        def probe(causal):
            return lambda model: quality_summary(
                {"exact match": task_quality(model, probe_tasks, probe_held, tokenizer, causal=causal)}, prefix="")

        secs: dict = {}

        def made(name, train_fn):
            """The model ``name``: reused from ``models_dir`` (when ``reuse``) or trained by ``train_fn`` and saved."""
            model = _reused(models_dir, name, reuse, log)
            if model is None:
                model, secs[name] = train_fn()
                save_model(model, tokenizer, models_dir, name)
            sizes[name] = os.path.getsize(os.path.join(models_dir, name, "model.safetensors"))
            return model

        def dlm_fn():
            model, t = train_dlm(train_ids, tokenizer, mc, tc, log, init=ar if tc.dlm_init == "ar" else None,
                                 probe=probe(False))
            if tc.anneal_steps:
                model, t_anneal = anneal_dlm(model, anneal_ids, tokenizer, tc, log, probe=probe(False))
                t += t_anneal
            return model, t

        if tc.dlm_init not in ("ar", "scratch"):
            raise ValueError(f"dlm_init must be 'ar' or 'scratch', got {tc.dlm_init!r}")
        anneal_ids = C.pack(world.anneal, tokenizer, tc.seq_len)
        ar = made("ar", lambda: train_ar(train_ids, tokenizer, mc, tc, log, probe=probe(True)))
        dlm = made("dlm", dlm_fn)
        ar_matched = made("ar_matched", lambda: train_ar_matched(ar, train_ids, anneal_ids, tokenizer, tc, log,
                                                                 probe=probe(True))) if tc.ar_matched else None
        qa_ids, qa_prompt = C.encode_prompted(sft_samples(world, tc.sft_base_frac, tc.sft_seq_len, tc.seed),
                                              tokenizer, tc.sft_seq_len)
        instruct = made("instruct", lambda: train_instruct(dlm, qa_ids, qa_prompt, tokenizer, tc, log))
        placebo = None
        if tc.placebo:
            pl_ids, pl_prompt = C.encode_prompted(sft_samples(world, tc.sft_base_frac, tc.sft_seq_len, tc.seed,
                                                              placebo=True), tokenizer, tc.sft_seq_len)
            placebo = made("placebo", lambda: train_instruct(dlm, pl_ids, pl_prompt, tokenizer, tc, log,
                                                             name="placebo"))
        metrics = evaluate_models(dlm, ar, instruct, world, tokenizer, tc, ar_matched=ar_matched, placebo=placebo)
        metrics.update({
            "training": training_record(tc),
            "model_config": asdict(mc), "train_config": {k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in asdict(tc).items()},
            "n_params": sum(p.numel() for p in dlm.parameters()),
            "file_bytes": sizes,
        })
        # wall times are logged, not stored: world.json stays byte-identical across rebuilds
        log(f"[world] models made in {time.perf_counter() - t0:.0f}s (training: "
            + ", ".join(f"{k} {v:.0f}s" for k, v in secs.items()) + ")")
        m = metrics
        log("[world] dlm masked acc " + ", ".join(f"{k}: {v['accuracy']:.3f} (unigram {v['unigram_accuracy']:.3f})"
                                                   for k, v in m["dlm_masked"].items()))
        log(f"[world] ar ppl {m['ar']['ppl']:.2f} (unigram {m['ar']['unigram_ppl']:.2f}); qa acc "
            + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in m["qa_accuracy"].items()))
        log(quality_summary(m["quality"]))
        return metrics
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
        torch.set_flush_denormal(False)
