"""The oracle's other sparsity rules (BatchTopK, threshold / JumpReLU, Matryoshka) on hand-checkable cases: they
judge the kernels, so they are checked against definitions, not against themselves."""
from __future__ import annotations

import pytest
import torch

from dlmscope import reference as R


def _identity_encoder(n: int):
    """``W_enc = I``, zero biases: the pre-activations are the input itself."""
    return torch.eye(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)


def test_batchtopk_keeps_the_batchs_largest_entries_and_ties_at_the_cut():
    W, b_enc, b_dec = _identity_encoder(4)
    x = torch.tensor([[5.0, 4.0, 0.5, -1.0],
                      [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    code = R.batchtopk_encode(x, W, b_enc, b_dec, k=2)          # B·k = 4: 5, 4, 0.5, 0.4
    assert torch.equal(code, torch.tensor([[5.0, 4.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.4]], dtype=torch.float64))
    assert (code > 0).sum(1).tolist() == [3, 1]                 # rows keep different counts
    assert float(R.batchtopk_min_selected(code)) == 0.4
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    assert int((R.batchtopk_encode(tied, W, b_enc, b_dec, k=2) > 0).sum()) == 3   # every entry at the cut kept
    few = torch.tensor([[2.0, -1.0, -1.0, -1.0]], dtype=torch.float64)             # k·B > #positive
    assert torch.equal(R.batchtopk_encode(few, W, b_enc, b_dec, k=3), torch.relu(few))
    assert float(R.batchtopk_min_selected(torch.zeros(2, 4))) == 0.0


def test_threshold_encode_per_latent_and_global():
    W, b_enc, b_dec = _identity_encoder(3)
    x = torch.tensor([[0.5, 1.5, 3.0]], dtype=torch.float64)
    theta = torch.tensor([1.0, 1.5, 1.0], dtype=torch.float64)   # an entry equal to its threshold is off
    assert torch.equal(R.threshold_encode(x, W, b_enc, b_dec, theta), torch.tensor([[0.0, 0.0, 3.0]],
                                                                                      dtype=torch.float64))
    assert torch.equal(R.threshold_encode(x, W, b_enc, b_dec, torch.tensor(1.0, dtype=torch.float64)),
                       torch.tensor([[0.0, 1.5, 3.0]], dtype=torch.float64))


def test_jumprelu_straight_through_gradients_follow_the_rectangle_kernel():
    pre = torch.tensor([[0.97, 1.2, 2.0], [1.04, 0.5, 3.0]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 2.5], dtype=torch.float64, requires_grad=True)
    eps = 0.1
    out = R.jumprelu(pre, theta, eps)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 1.2, 0.0], [1.04, 0.0, 3.0]], dtype=torch.float64))
    out.sum().backward()
    assert torch.equal(pre.grad, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64))
    # |pre − θ| < ε/2 = 0.05 only at (0, 0) and (1, 0): each adds −θ/ε = −10 to θ_0
    assert theta.grad.tolist() == pytest.approx([-20.0, 0.0, 0.0])
    theta.grad = None
    l0 = R.jumprelu_l0(pre, theta, eps)
    assert float(l0.detach()) == pytest.approx(1.5)             # 1 and 2 active entries
    l0.backward()
    assert theta.grad.tolist() == pytest.approx([-2 * (1 / eps) / 2, 0.0, 0.0])   # mean over 2 rows


def test_matryoshka_prefixes_use_the_latents_below_each_size():
    W_dec = torch.eye(4, dtype=torch.float64)
    b_dec = torch.zeros(4, dtype=torch.float64)
    values = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    indices = torch.tensor([[3, 0, 1]])
    recon = R.matryoshka_reconstructions(values, indices, W_dec, b_dec, [1, 2, 4])
    assert recon[:, 0].tolist() == [[2.0, 0, 0, 0], [2.0, 3.0, 0, 0], [2.0, 3.0, 0, 1.0]]
    assert torch.equal(recon[-1], R.sparse_decode(values, indices, W_dec, b_dec))
    x = torch.tensor([[2.0, 3.0, 0.0, 1.0]], dtype=torch.float64)
    assert float(R.matryoshka_loss(x, values, indices, W_dec, b_dec, [1, 2, 4])) == pytest.approx(10.0 + 1.0 + 0.0)
