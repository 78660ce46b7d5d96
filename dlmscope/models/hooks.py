"""Forward hooks on a model's blocks: read, replace or add to a block's hidden state for the length of a ``with``.

A decoder block returns its hidden state ``[B, T, d]`` either as a plain tensor (transformers >= 5.2) or as
the first element of a tuple / list (older and remote code); :func:`block_output` and :func:`replace_output`
hide the difference. Three context managers cover every use:

* :func:`capture` — ``fn(hidden)`` on each forward, the output left as it is (harvesting, SAE-guided decoding);
* :func:`replace` — the hidden state becomes ``fn(hidden)`` (SAE splicing, ablation);
* :func:`intervene` — ``delta(hidden)`` is added to the hidden state, outside autograd (steering).

:func:`record_input_ids` keeps the token ids of the latest forward, for hooks whose edit depends on them.
:func:`record_outputs` and :func:`replay_outputs` let several forwards that differ only from block L on share
blocks ``0 … L−1``: one forward records their outputs, the others skip them and get (copies of) the recorded ones.
Each registers its hook on entry and removes it on exit, also when the body raises; nothing is registered
before the ``with`` is entered. This module knows nothing of SAEs: the functions it calls are the caller's.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["block_output", "replace_output", "capture", "replace", "intervene", "InputIds", "record_input_ids",
           "record_outputs", "replay_outputs"]


def block_output(out: Any) -> Tensor:
    """The hidden state ``[B, T, d]`` of a block's output: the tensor itself or the first element of a
    tuple / list."""
    return out[0] if isinstance(out, (tuple, list)) else out


def replace_output(out: Any, new: Tensor) -> Any:
    """``out`` with its hidden state replaced by ``new``, in the same container type (the rest of a tuple or
    list is kept); ``out`` itself is not modified."""
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    if isinstance(out, list):
        return [new] + list(out[1:])
    return new


@contextlib.contextmanager
def _registered(register: Callable[[], RemovableHandle]) -> Iterator[None]:
    """Call ``register()`` (which registers a hook and returns its handle) on entry; remove the hook on exit."""
    handle = register()
    try:
        yield
    finally:
        handle.remove()


def _output_hook(module: nn.Module, hook: Callable[[Any], Any]):
    """``hook(out)`` after every forward of ``module``; what it returns, unless None, replaces the output."""
    return _registered(lambda: module.register_forward_hook(lambda _module, _args, out: hook(out)))


def capture(module: nn.Module, fn: Callable[[Tensor], None]):
    """Context manager: every forward of ``module`` calls ``fn(hidden [B, T, d])``; the output is unchanged
    (``fn`` may raise to stop the forward)."""
    def hook(out):
        fn(block_output(out))

    return _output_hook(module, hook)


def replace(module: nn.Module, fn: Callable[[Tensor], Tensor]):
    """Context manager: every forward of ``module`` outputs ``fn(hidden)`` (``[B, T, d]`` → ``[B, T, d]``) in
    place of its hidden state, under the caller's grad mode (gradients flow through ``fn``)."""
    def hook(out):
        return replace_output(out, fn(block_output(out)))

    return _output_hook(module, hook)


def intervene(module: nn.Module, delta: Callable[[Tensor], Tensor | None]):
    """Context manager: every forward of ``module`` outputs ``hidden + delta(hidden)`` (a new tensor, the
    delta cast to the hidden state's dtype); where ``delta`` returns None the output is left as it is.

    The hook runs under ``torch.no_grad()``: an intervention is an edit of the forward pass, and the edited
    output carries no gradient.
    """
    @torch.no_grad()
    def hook(out):
        x = block_output(out)
        d = delta(x)
        return None if d is None else replace_output(out, x + d.to(x.dtype))

    return _output_hook(module, hook)


class InputIds:
    """The token ids ``[B, T]`` of the latest forward seen by :func:`record_input_ids` (None before the first,
    or when the model was called with embeddings instead of ids)."""

    __slots__ = ("ids",)

    def __init__(self) -> None:
        self.ids: Tensor | None = None


@contextlib.contextmanager
def record_input_ids(model: nn.Module) -> Iterator[InputIds]:
    """Context manager yielding an :class:`InputIds` that every forward of ``model`` updates (a pre-hook on
    its input embedding, which sees the ids before any block runs)."""
    seen = InputIds()

    def hook(_module, args, kwargs):
        ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
        seen.ids = ids if isinstance(ids, Tensor) else None

    embedding = model.get_input_embeddings()
    with _registered(lambda: embedding.register_forward_pre_hook(hook, with_kwargs=True)):
        yield seen


@contextlib.contextmanager
def record_outputs(modules: Sequence[nn.Module]) -> Iterator[list[list[Any]]]:
    """Context manager yielding ``outputs``: ``outputs[i]`` lists what ``modules[i]`` returned in each forward
    within the ``with``, in call order (the objects themselves, for :func:`replay_outputs`)."""
    outputs: list[list[Any]] = [[] for _ in modules]
    with contextlib.ExitStack() as stack:
        for module, mine in zip(modules, outputs):
            stack.enter_context(_registered(
                lambda m=module, o=mine: m.register_forward_hook(lambda _m, _a, out: o.append(out))))
        yield outputs


def _copy(out: Any) -> Any:
    """``out`` with its tensors (itself, or the items of a tuple / list) cloned, so that a caller writing into
    its input in place cannot change what is replayed next."""
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(x.clone() if isinstance(x, Tensor) else x for x in out)
    return out


@contextlib.contextmanager
def replay_outputs(modules: Sequence[nn.Module], outputs: list[list[Any]]) -> Iterator[None]:
    """Context manager: within it each module's forward does no work and returns its recorded output (``outputs``
    from :func:`record_outputs`), the j-th call of a forward the j-th recorded output; a call beyond the recorded
    ones raises ``RuntimeError``. The last module's output, the only one that reaches a module that runs, is
    handed out as a copy, so writing into it in place cannot change the next replay. Right only when the modules' inputs are the recorded forward's:
    replay blocks ``0 … L−1`` while editing block L or later, on the same input ids. Hooks on the modules
    still run."""
    if len(outputs) != len(modules):
        raise ValueError(f"{len(outputs)} recorded output lists for {len(modules)} modules")
    saved = []
    try:
        for i, (module, mine) in enumerate(zip(modules, outputs)):
            calls = iter(mine)

            def forward(*_args, _calls=calls, _module=module, _hand=_copy if i == len(modules) - 1 else None,
                        **_kwargs):
                try:
                    out = next(_calls)
                    return _hand(out) if _hand else out
                except StopIteration:
                    raise RuntimeError(f"{type(_module).__name__} was called more often than in the recorded "
                                       f"forward") from None

            saved.append((module, module.__dict__.get("forward")))
            module.forward = forward
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
