"""Random SAE parameters with a top-k checker (ops, backends), random and exact TopKSAEs (splice, metrics, transfer),
perturbed seeded TopKSAEs (tests/sae)."""
from __future__ import annotations

import torch

from dlmscope import reference
from dlmscope.sae.topk import TopKSAE

from tests.helpers.tiny_models import D  # the tiny models' hidden size: these SAEs splice into them


def make_sae(B, d, n, dtype, device, seed=0, bias_shift=0.0):
    """Random SAE parameters and activations; decoder rows unit norm, W_enc = W_dec.T-style init plus noise."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    W_enc = W_dec + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    b_enc = 0.1 * torch.randn(n, generator=g, dtype=torch.float64) + bias_shift
    b_dec = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (x, W_enc, b_enc, W_dec, b_dec)]


def check_topk(values, indices, x, W_enc, b_enc, b_dec, k, tol):
    """The selection is a valid top-k of relu(pre): right values at the returned indices, right multiset."""
    B = x.shape[0]
    n = W_enc.shape[0]
    assert values.shape == (B, k) and indices.shape == (B, k)
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    idx = indices.cpu()
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert all(len(set(row.tolist())) == k for row in idx), "indices must be distinct within a row"
    x64, W64, be64, bd64 = (t.cpu().double() for t in (x, W_enc, b_enc, b_dec))
    pre = reference.pre_activations(x64, W64, be64, bd64)
    relu = pre.clamp_min(0)
    # rounding error scales with the magnitudes summed into pre (a cancelling sum can be tiny), not with pre
    terms = (x64.abs() + bd64.abs()) @ W64.abs().T + be64.abs()
    scale = max(float(terms.max()), 1e-6)
    at_idx = relu.gather(1, idx)
    torch.testing.assert_close(values.cpu().double(), at_idx, atol=tol * scale, rtol=0)
    ref_sorted = relu.topk(k, dim=1).values
    got_sorted = values.cpu().double().sort(dim=1, descending=True).values
    torch.testing.assert_close(got_sorted, ref_sorted, atol=tol * scale, rtol=0)


def random_sae(seed=0, n=64, k=8):
    """A random TopKSAE of width D (zero biases)."""
    return TopKSAE(D, n, k, generator=torch.Generator().manual_seed(seed))


def perfect_sae():
    """A TopKSAE that reconstructs exactly: latents ±e_i, k = d (only d of the 2d pre-activations are positive)."""
    sae = TopKSAE(D, 2 * D, D)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(torch.cat([eye, -eye]))
    return sae


def random_biased_sae(seed: int, d: int = 32, n: int = 48, k: int = 4) -> TopKSAE:
    """A random TopKSAE (d=32, n=48, k=4 unless given) with a non-zero encoder bias."""
    sae = TopKSAE(d, n, k, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a non-zero encoder bias, so that the code depends on more than the directions
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)))
    return sae


def perturbed_sae(dtype=torch.float32, *, meta=None, backend=None, device=None, seed=0, d=16, n=64, k=4) -> TopKSAE:
    """A seeded TopKSAE (d=16, n=64, k=4 unless given) moved off its init: non-zero biases and an encoder untied
    from the decoder, so every parameter matters (tests/sae: the module, its checkpoint formats, SAEBench)."""
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, n, k, meta=meta, backend=backend, dtype=dtype, generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        sae.W_enc.add_(torch.randn(n, d, generator=g) * 0.05)
    return sae.to(device) if device is not None else sae
