"""The ``chunked`` encoder selects exactly what one top-k over the full pre-activations selects, whatever the
chunk (smaller than k, not dividing n, larger than n)."""
from __future__ import annotations

import pytest
import torch

import dlmscope


@pytest.mark.parametrize("chunk", [1, 5, 8, 33, 63, 64, 1000])
def test_chunked_encode_equals_one_topk(monkeypatch, chunk):
    monkeypatch.setenv("DLMSCOPE_CHUNK_LATENTS", str(chunk))
    gen = torch.Generator().manual_seed(chunk)
    x = torch.randn(17, 12, generator=gen, dtype=torch.float64)
    W = torch.randn(64, 12, generator=gen, dtype=torch.float64)
    b_enc, b_dec = torch.randn(64, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    for k in (1, 5, 64):
        v, i = dlmscope.topk_encode(x, W, b_enc, b_dec, k, backend="chunked")
        rv, ri = dlmscope.topk_encode(x, W, b_enc, b_dec, k, backend="torch")
        torch.testing.assert_close(v.sort(-1).values, rv.sort(-1).values, rtol=1e-12, atol=1e-12)  # BLAS blocking
        pos = v > 0                                             # positive picks are unique; zero pads may differ
        assert all(set(a[p].tolist()) == set(b[q].tolist()) for a, b, p, q in zip(i, ri, pos, rv > 0))
        assert all(len(set(row.tolist())) == k for row in i)  # distinct within a row


def test_bad_chunk_setting(monkeypatch):
    monkeypatch.setenv("DLMSCOPE_CHUNK_LATENTS", "zero")
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="DLMSCOPE_CHUNK_LATENTS"):
        dlmscope.topk_encode(x, torch.randn(8, 4), torch.zeros(8), torch.zeros(4), 2, backend="chunked")


def test_weighted_row_sum_widens_in_chunks(monkeypatch):
    from dlmscope.backends import base

    monkeypatch.setattr(base, "ROW_SUM_CHUNK", 7)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(50, 6, generator=gen).to(torch.bfloat16)
    coef = torch.randn(50, generator=gen).to(torch.bfloat16)
    got = base.weighted_row_sum(coef, W)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, coef.double() @ W.double(), rtol=1e-5, atol=1e-5, check_dtype=False)
    W32, c32 = W.float(), coef.float()
    torch.testing.assert_close(base.weighted_row_sum(c32, W32), c32 @ W32)


def test_encoder_tile_override_is_validated(monkeypatch):
    from dlmscope.kernels._launch import tile_override

    monkeypatch.delenv("DLMSCOPE_ENCODE_TILE", raising=False)
    assert tile_override(64) is None
    monkeypatch.setenv("DLMSCOPE_ENCODE_TILE", "128,128,64,8,3")
    assert tile_override(64) == (128, 128, 64, 8, 3)
    with pytest.raises(ValueError, match="BLOCK_N=128 must be >= KP=256"):
        tile_override(256)
    for bad in ("128,128,64,8", "128,100,64,8,3", "a,b,c,d,e"):
        monkeypatch.setenv("DLMSCOPE_ENCODE_TILE", bad)
        with pytest.raises(ValueError, match="DLMSCOPE_ENCODE_TILE"):
            tile_override(64)
