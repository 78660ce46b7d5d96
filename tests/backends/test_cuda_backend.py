"""The ``cuda`` backend (csrc/cuda via ctypes): the binding agrees with the C header, the sort cache's rules, and —
on a GPU — the kernels' hard cases against the float64 reference. (Every op's general reference tests run the
``cuda`` backend too, through the backend list of ``tests/helpers/devices.py``.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dlmscope
from dlmscope import reference
from dlmscope.backends import cuda_lib, get_backend
from dlmscope.backends.base import Backend, SortCache

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "dlmscope_cuda.h"
needs_cuda_backend = pytest.mark.skipif("cuda" not in dlmscope.available_backends(),
                                        reason="needs a GPU and libdlmscope_cuda.so (make cuda)")


def header_arities() -> dict[str, int]:
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    out = {}
    for name, args in re.findall(r"\b(dlm_\w+)\s*\(([^)]*)\)\s*;", text):
        out[name] = 0 if args.strip() in ("", "void") else args.count(",") + 1
    return out


def test_binding_declares_every_function_of_the_header_with_its_arity():
    arities = header_arities()
    assert arities and set(arities) == set(cuda_lib._SIGNATURES)
    for name, (args, _res) in cuda_lib._SIGNATURES.items():
        assert len(args) == arities[name], name


def test_library_symbols_match_the_binding_where_it_is_built():
    if not cuda_lib.library_path().exists():
        pytest.skip("libdlmscope_cuda.so not built here (make cuda)")
    lib = cuda_lib.load()  # sets every signature: a missing symbol raises AttributeError
    assert lib.dlm_error_string(1) == b"invalid argument"
    assert lib.dlm_transpose_reduce_partials(1000, 64, 16) == 2 * 16 * 17
    # argument checks happen before any launch, so they run without a GPU: k > cols is refused
    assert lib.dlm_topk_select(None, 0, 1, 5, 5, None, None, 0, 6, None, None, 6, 0, None) != 0


def test_missing_library_names_the_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(cuda_lib.LIB_ENV, str(tmp_path / "nope.so"))
    cuda_lib.load.cache_clear()
    try:
        with pytest.raises(OSError, match="nope.so.*make cuda"):
            cuda_lib.load()
    finally:
        cuda_lib.load.cache_clear()


def test_sort_cache_reuses_a_sort_only_for_the_same_unchanged_ids():
    calls = []
    cache = SortCache(lambda idx, n: calls.append((idx.clone(), n)) or len(calls))
    idx = torch.tensor([[3, 1], [1, 0]])
    assert cache.get(idx, 4) == 1 and cache.get(idx, 4) == 1
    assert cache.get(idx[:, :], 4) == 1                      # a full view: same memory, same layout
    assert cache.get(idx, 5) == 2                            # another n
    idx[0, 0] = 2                                            # in place: the version counter moves
    assert cache.get(idx, 5) == 3
    assert cache.get(idx.clone(), 5) == 4                    # equal values, other memory: sorted again
    assert cache.get(idx[:, :1], 5) == 5                     # a narrower view of the same memory
    assert len(calls) == 5


# ---- on a GPU ---------------------------------------------------------------------------------------------

def _dev():
    return torch.device("cuda")


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transpose_reduce_splits_a_heavy_latent_and_zeroes_empty_ones(dtype):
    B, k, d, n = 3000, 4, 200, 50
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(1, n - 5, (B, k), generator=g)
    idx[:, 0] = 7                      # latent 7 on every row: B entries, split over many blocks
    idx[:, 1] = torch.where(idx[:, 1] == 7, 8, idx[:, 1])
    coef = torch.randn(B, k, generator=g, dtype=torch.float64)
    X = torch.randn(B, d, generator=g, dtype=torch.float64)
    ref_out, ref_sum = reference.transpose_reduce(coef, idx, X, n)
    out, coef_sum = get_backend("cuda").transpose_reduce(coef.to(_dev(), dtype), idx.to(_dev()),
                                                          X.to(_dev(), dtype), n)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    scale = float((coef.abs().unsqueeze(-1) * X.abs().unsqueeze(1)).sum((0, 1)).max())
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=tol * scale, rtol=0)
    torch.testing.assert_close(coef_sum.double().cpu(), ref_sum, atol=tol * B, rtol=0)
    assert (out[0] == 0).all() and (out[n - 4:] == 0).all()  # latents that never occur


@needs_cuda_backend
def test_decode_backward_shares_the_encoders_sort_and_fuses_sddmm():
    backend = get_backend("cuda")
    B, k, d, n = 64, 8, 96, 300
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]).to(_dev())
    values = torch.rand(B, k, generator=g).to(_dev())
    grad = torch.randn(B, d, generator=g).to(_dev())
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(_dev())
    d_values, dW, db = backend.decode_backward(grad, values, idx, W)
    layout = backend._sorts.get(idx, n)
    assert backend._sorts.get(idx, n) is layout                # the encoder's transpose-reduce reuses it
    torch.testing.assert_close(d_values, (grad.unsqueeze(1) * W[idx]).sum(-1), atol=1e-4, rtol=1e-4)
    ref_dW, _ = reference.transpose_reduce(values.double().cpu(), idx.cpu(), grad.double().cpu(), n)
    torch.testing.assert_close(dW.double().cpu(), ref_dW, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(db, grad.sum(0), atol=1e-4, rtol=1e-4)


@needs_cuda_backend
@pytest.mark.parametrize("k", [1, 256, 820])
def test_encode_large_k_and_grouped_auxk_from_one_gemm(k, monkeypatch):
    from tests.helpers.saes import check_topk, make_sae
    monkeypatch.setenv("DLMSCOPE_CHUNK_LATENTS", "1000")
    B, d, n = 33, 3584 // 16, 2500
    x, W_enc, b_enc, _W_dec, b_dec = make_sae(B, d, n, torch.float32, _dev(), seed=k)
    backend = get_backend("cuda")
    values, indices = backend.encode(x, W_enc, b_enc, b_dec, k)
    check_topk(values, indices, x, W_enc, b_enc, b_dec, k, 2e-5)
    dead = torch.rand(n, generator=torch.Generator().manual_seed(k)) < 0.3
    got = backend.encode_grouped(x, W_enc, b_enc, b_dec, [k, 3], [n - 700, 700], dead.to(_dev()), [5, 2])
    want = Backend.encode_grouped(backend, x, W_enc, b_enc, b_dec, [k, 3], [n - 700, 700], dead.to(_dev()), [5, 2])
    for a, b in zip(got, want):
        assert a.shape == b.shape
    for a, b in ((got[0], want[0]), (got[2], want[2])):     # the same values (ids may differ only among ties)
        torch.testing.assert_close(a.sort(1).values, b.sort(1).values, atol=1e-4, rtol=1e-4)
    assert dead.to(_dev())[got[3][got[2] > 0]].all()            # AuxK picks only dead latents


@needs_cuda_backend
def test_decoder_norm_keeps_zero_rows_zero_and_matches_reference():
    n, d = 40, 3000
    g = torch.Generator().manual_seed(2)
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    W[3] = 0
    grad = torch.randn(n, d, generator=g, dtype=torch.float64)
    grad[5] = 0
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    ref = [t.clone() for t in (W, m, v)]
    reference.decoder_norm_step(ref[0], grad, ref[1], ref[2], 1, 1e-3)
    got = [t.float().to(_dev()) for t in (W, m, v)]
    get_backend("cuda").decoder_norm_step(got[0], grad.float().to(_dev()), got[1], got[2], 1, 1e-3, 0.9, 0.999, 1e-8)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(got[0]).all()
