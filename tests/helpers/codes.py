"""Comparing a backend's sparse code with the float64 reference where the backend may compute in float32.

Where a backend computes float64 natively, its codes must equal the float64 reference (1e-12). Triton has no
float64 (tests/helpers/devices.py): it computes float64 inputs in float32, so it is held to float32 level
(``tolerance``), and an entry whose pre-activation lies within float32 rounding of a selection cut (a threshold,
BatchTopK's tau, a JumpReLU window edge) may legitimately land on either side of it.
"""
from __future__ import annotations

import torch

from dlmscope import reference
from .devices import native_float64, tolerance

F64 = torch.float64


def pre_and_slack(backend, x, W_enc, b_enc, b_dec):
    """The float64 reference pre-activations [R, n] and how far ``backend``'s may be from them: 0 where it computes
    float64 natively, else ``tolerance`` times the size of the terms summed into each entry (float32 rounding scales
    with those, not with a cancelling sum)."""
    x, W_enc, b_enc, b_dec = (t.detach().double().cpu() for t in (x, W_enc, b_enc, b_dec))
    x = x.reshape(-1, x.shape[-1])
    pre = reference.pre_activations(x, W_enc, b_enc, b_dec)
    if native_float64(backend):
        return pre, torch.zeros_like(pre)
    return pre, tolerance(F64, backend) * ((x.abs() + b_dec.abs()) @ W_enc.abs().T + b_enc.abs())


def batchtopk_cut(x, W_enc, b_enc, b_dec, k):
    """Where the reference's BatchTopK selection cuts: midway between the (B·k)-th and (B·k+1)-th largest entries
    of relu(pre) (0 when fewer than B·k are positive, or B·k is every entry): entries far from it keep their side."""
    act = reference.pre_activations(x.reshape(-1, x.shape[-1]), W_enc, b_enc, b_dec).clamp_min(0)
    kept = k * act.shape[0]
    if kept >= act.numel():
        return act.new_zeros(())
    return act.flatten().topk(kept + 1).values[-2:].mean()


def assert_code(got, want, backend, sae_args, cut):
    """A dense code got [R, n] from ``backend`` against the float64 reference code want [R, n] of the inputs
    sae_args = (x, W_enc, b_enc, b_dec), whose selection cuts at ``cut`` (a threshold, 0-d or [n], or tau).
    Native float64: equal to 1e-12. Otherwise values to float32 level, and the selection compared only away from
    the cut: an entry within float32 rounding of the cut may be kept or dropped, but if kept its value is its pre."""
    got, want = got.detach().reshape(want.shape).cpu(), want.detach()
    if native_float64(backend):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        return
    pre, slack = pre_and_slack(backend, *sae_args)
    near = (pre - cut).abs() <= slack
    assert not bool(near.all())
    ok = ((got - want).abs() <= slack) | (near & ((got == 0) | ((got - pre).abs() <= slack)))
    assert bool(ok.all()), f"{int((~ok).sum())} entries differ; largest {float((got - want).abs()[~ok].max())}"


def assert_away_from(backend, sae_args, *cuts):
    """For a backend without native float64: no pre-activation lies within float32 rounding of any of ``cuts``, so
    it selects exactly what the float64 reference does and values and gradients compare at float32 tolerance
    (the inputs are chosen so; gradients jump at a cut, so there is nothing to compare near one)."""
    if native_float64(backend):
        return
    pre, slack = pre_and_slack(backend, *sae_args)
    for cut in cuts:
        gap = (pre - cut).abs()
        assert bool((gap > slack).all()), f"an entry within rounding of a cut: gap {float(gap.min())}"
