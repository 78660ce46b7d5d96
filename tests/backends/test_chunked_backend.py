"""The ``chunked`` encoder selects exactly what one top-k over the full pre-activations selects, whatever the
chunk (smaller than k, not dividing n, larger than n)."""
from __future__ import annotations

import importlib
import importlib.util
import os

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


_TRITON_HERE = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@pytest.mark.skipif(not _TRITON_HERE or importlib.util.find_spec("triton") is None,
                    reason="the Triton select needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("B,d,n,k,chunk,dtype,min_k", [
    (3, 8, 700, 300, 7, torch.float32, None),       # the shipped threshold: chunks of k=300, last one 100 wide
    (5, 12, 64, 5, 8, torch.bfloat16, 2),           # threshold lowered: 8 chunks, ragged nothing
    (4, 10, 50, 9, 7, torch.float16, 2),            # chunk < k -> chunks of k, last narrower than k
    (4, 10, 50, 6, 1000, torch.float32, 2),         # one chunk: no merge
])
def test_chunked_encode_with_triton_select(monkeypatch, B, d, n, k, chunk, dtype, min_k):
    """From SELECT_MIN_K the chunks' top-k is the Triton threshold-then-compact select: a valid top-k against
    float64 (check_topk of tests/helpers/saes.py), ids distinct, and the select really ran."""
    from dlmscope.backends import chunked_backend
    select_mod = importlib.import_module("dlmscope.kernels.topk_select")   # the module (the package exports the function)

    from tests.helpers.devices import tolerance
    from tests.helpers.saes import check_topk, make_sae

    monkeypatch.setenv("DLMSCOPE_CHUNK_LATENTS", str(chunk))
    if min_k is not None:
        monkeypatch.setattr(chunked_backend, "SELECT_MIN_K", min_k)
    calls = []
    real = select_mod.topk_select
    monkeypatch.setattr(select_mod, "topk_select", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
    x, W_enc, b_enc, _, b_dec = make_sae(B, d, n, dtype, device, seed=n + k, bias_shift=-0.5)
    values, indices = dlmscope.topk_encode(x, W_enc, b_enc, b_dec, k, backend="chunked")
    check_topk(values, indices, x, W_enc, b_enc, b_dec, k, tolerance(dtype, "chunked"))
    width = max(chunk, k)
    assert calls == [min(k, min(s + width, n) - s) for s in range(0, n, width)]


@pytest.mark.parametrize("chunk", [3, 16, 1000])
def test_grouped_auxk_comes_from_the_same_chunks_and_equals_separate_encodes(monkeypatch, chunk):
    """encode_grouped's main and AuxK selections off one chunked pass equal the default (one encode per segment and
    one more per AuxK selection), for segments that start off the chunk grid."""
    from dlmscope.backends import get_backend
    from dlmscope.backends.base import Backend

    monkeypatch.setenv("DLMSCOPE_CHUNK_LATENTS", str(chunk))
    gen = torch.Generator().manual_seed(chunk)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    W = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    b_enc, b_dec = torch.randn(40, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    dead = torch.rand(40, generator=gen) < 0.4
    backend = get_backend("chunked")
    got = backend.encode_grouped(x, W, b_enc, b_dec, [4, 2], [25, 15], dead, [6, 3])
    want = Backend.encode_grouped(backend, x, W, b_enc, b_dec, [4, 2], [25, 15], dead, [6, 3])
    for (gv, gi), (wv, wi) in (((got[0], got[1]), (want[0], want[1])), ((got[2], got[3]), (want[2], want[3]))):
        assert gv.shape == wv.shape and gi.shape == wi.shape
        for cols in (slice(0, gv.shape[1] * 2 // 3), slice(gv.shape[1] * 2 // 3, None)):   # per segment block
            torch.testing.assert_close(gv[:, cols].sort(-1).values, wv[:, cols].sort(-1).values)
        pos = gv > 0
        assert all(set(a[p].tolist()) == set(b[q].tolist()) for a, b, p, q in zip(gi, wi, pos, wv > 0))
    assert dead[got[3][got[2] > 0]].all()                                       # AuxK picks only dead latents
    assert (got[1][:, :4] < 25).all() and (got[1][:, 4:] >= 25).all()           # global ids, segment by segment
