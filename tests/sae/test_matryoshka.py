"""MatryoshkaSAE against the oracle (BatchTopK codes, every prefix's loss), and ``dlmscope.sae.load`` returning the
class of any architecture's checkpoint."""
from __future__ import annotations

import pytest
import torch

from dlmscope import reference as R
from dlmscope import sae as S


def _f64(sae):
    return sae.to(torch.float64)


def test_prefix_losses_equal_the_reference_on_batchtopk_codes():
    torch.manual_seed(0)
    sae = _f64(S.MatryoshkaSAE(12, 40, 3, prefixes=[5, 17, 40], generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(16, 12, dtype=torch.float64)
    losses = sae.prefix_losses(x)
    dense = R.batchtopk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, 3)
    values, indices = dense.topk(dense.shape[1])             # every latent, zeros included: the dense code
    ref = [R.mse_loss(x, r) for r in R.matryoshka_reconstructions(values, indices, sae.W_dec, sae.b_dec,
                                                                   [5, 17, 40])]
    torch.testing.assert_close(losses, torch.stack(ref), rtol=1e-10, atol=1e-10)
    # the loss is the sum; its gradients reach the encoder (through BatchTopK) and the decoder
    losses.sum().backward()
    assert sae.W_enc.grad.abs().sum() > 0 and sae.W_dec.grad.abs().sum() > 0 and sae.b_dec.grad.abs().sum() > 0
    # the last dictionary is the whole SAE: its reconstruction is forward's (training mode, same batch)
    sae.zero_grad()
    full = sae.prefix_reconstructions(*sae.encode(x, update_threshold=False))[-1]
    torch.testing.assert_close(full, sae(x), rtol=1e-12, atol=1e-12)


def test_matryoshka_config_and_eval_mode_threshold():
    sae = S.MatryoshkaSAE(8, 16, 2, prefixes=[4, 16])
    assert sae.cfg.arch == "matryoshka" and sae.prefixes == [4, 16]
    with pytest.raises(ValueError, match="prefixes"):
        S.MatryoshkaSAE(8, 16, 2, prefixes=[4, 8])
    x = torch.randn(64, 8)
    sae(x)                                                    # training mode: the threshold's first update
    assert float(sae.threshold) > 0
    sae.eval()
    values, _ = sae.encode(x)
    assert bool((values[values > 0] > sae.threshold).all())


@pytest.mark.parametrize("make", [
    lambda: S.TopKSAE(8, 16, 2),
    lambda: S.BatchTopKSAE(8, 16, 2),
    lambda: S.JumpReLUSAE(8, 16, 2),
    lambda: S.MatryoshkaSAE(8, 16, 2, prefixes=[4, 8, 16]),
], ids=["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_load_returns_each_architectures_class(tmp_path, make):
    sae = make()
    x = torch.randn(32, 8)
    sae(x)                                                    # BatchTopK-based: sets a threshold
    sae.eval()
    sae.save(tmp_path / "sae")
    got = S.load(tmp_path / "sae").eval()
    assert type(got) is type(sae) and got.cfg == sae.cfg
    torch.testing.assert_close(got(x), sae(x), rtol=1e-5, atol=1e-6)
    assert S.CLASSES[sae.cfg.arch] is type(sae)


def test_matryoshka_saves_cap_and_threshold_beta(tmp_path):
    sae = S.MatryoshkaSAE(8, 16, 2, prefixes=[4, 16], cap=3, threshold_beta=0.5)
    got = S.load(sae.save(tmp_path / "m"))
    assert type(got) is S.MatryoshkaSAE and (got.cap, got.threshold_beta, got.prefixes) == (3, 0.5, [4, 16])
    assert got.cfg == sae.cfg


def test_load_reads_a_peer_checkpoint_as_topk(tmp_path):
    S.TopKSAE(8, 16, 2).save(tmp_path / "p", format="saelens")
    assert type(S.load(tmp_path / "p")) is S.TopKSAE
