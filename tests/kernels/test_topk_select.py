"""The threshold-then-compact select (dlmscope/kernels/topk_select.py) against float64: exactly the k largest of
relu(pre + bias) in fp32 per row (ties to the lower column), those fp32 values, global ids.

Runs on CUDA, or on CPU under the Triton interpreter; skipped otherwise. Rows are short (the interpreter sweeps
32 columns a step), the radix passes are the same as on a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (_INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (the interpreter on CPU)",
                allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from dlmscope.kernels import topk_select  # noqa: E402

DEV = torch.device("cpu" if _INTERPRET else "cuda")


def _oracle(pre, bias):
    """relu(float(pre) + float(bias)) in fp32, as the kernel computes it, widened to float64."""
    v = pre.float().cpu() + (bias.float().cpu() if bias is not None else 0)
    return v.clamp_min(0).double()


def _check(pre, bias, k, values, indices, id_offset=0):
    """Exact selection: the values are the oracle's at the ids, every other entry is <= the smallest kept one,
    and an entry equal to it is left out only if a kept tie has a lower column (lowest-column tie-break)."""
    B, C = pre.shape
    ref = _oracle(pre, bias)
    assert values.shape == (B, k) == indices.shape and indices.dtype == torch.int64
    cols = indices.cpu() - id_offset
    assert int(cols.min()) >= 0 and int(cols.max()) < C
    assert all(len(set(r)) == k for r in cols.tolist()), "repeated ids in a row"
    assert bool((cols.diff(dim=1) > 0).all()), "column order"
    at = ref.gather(1, cols)
    torch.testing.assert_close(values.cpu(), at.to(values.dtype), rtol=0, atol=0)
    thr = at.min(1, keepdim=True).values
    left = ref.scatter(1, cols, -1.0)
    assert bool((left <= thr).all())
    # ties at the threshold: the kept ones are the lowest columns among all entries equal to it
    for r in range(B):
        tied = (ref[r] == thr[r]).nonzero().flatten().tolist()
        kept = [c for c in cols[r].tolist() if ref[r, c] == thr[r]]
        assert kept == tied[:len(kept)]


@pytest.mark.parametrize("B,C,k,dtype", [
    (5, 70, 3, torch.float32),
    (4, 300, 1, torch.bfloat16),      # k = 1, ragged last sweep
    (3, 64, 64, torch.float16),       # k = C
    (6, 200, 130, torch.bfloat16),    # k > C / 2
    (2, 1, 1, torch.float32),         # one column
])
def test_topk_select_matches_oracle(B, C, k, dtype):
    g = torch.Generator().manual_seed(B * 1000 + C + k)
    pre = torch.randn(B, C, generator=g).to(dtype).to(DEV)
    bias = (0.1 * torch.randn(C, generator=g)).to(dtype).to(DEV)
    values, indices = topk_select(pre, bias, k, id_offset=1000)
    assert values.dtype == torch.float32
    _check(pre, bias, k, values, indices, id_offset=1000)


def test_topk_select_ties_fewer_positives_and_huge_values():
    """Rows with many exact ties, rows with fewer than k positives (zeros at the lowest columns), a row of huge
    values (all 31 value bits in play) and no bias."""
    C, k = 90, 20
    pre = torch.zeros(5, C)
    pre[0] = 1.5                                             # all tied
    pre[1, ::3] = 2.0                                        # 30 ties at 2.0, the rest 0
    pre[2, 50:] = -1.0
    pre[2, [4, 40, 80]] = torch.tensor([3.0, 1.0, 2.0])      # 3 positives: 17 zeros padded
    pre[3] = -torch.arange(C, dtype=torch.float32)           # none positive
    pre[4] = torch.logspace(30, 37, C)[torch.randperm(C, generator=torch.Generator().manual_seed(0))]
    pre = pre.to(DEV)
    values, indices = topk_select(pre, None, k)
    _check(pre, None, k, values, indices)
    assert indices[2].tolist()[:3] == [0, 1, 2] and sorted(values[2].tolist())[-3:] == [1.0, 2.0, 3.0]


def test_topk_select_into_column_blocks():
    """Preallocated outputs: a column block of a wider buffer (what the chunked encoder merges)."""
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(4, 100, generator=g).to(DEV)
    bias = torch.randn(100, generator=g).to(DEV)
    vals = torch.full((4, 30), -7.0, device=DEV)
    ids = torch.full((4, 30), -7, dtype=torch.int64, device=DEV)
    topk_select(pre, bias, 10, id_offset=5, values=vals[:, 10:20], indices=ids[:, 10:20])
    _check(pre, bias, 10, vals[:, 10:20], ids[:, 10:20], id_offset=5)
    assert bool((vals[:, :10] == -7).all() and (vals[:, 20:] == -7).all() and (ids[:, :10] == -7).all())


def test_chunked_topk_merges_a_full_candidate_buffer_in_place():
    """Many chunks of a few latents: the [B, 8k] candidate buffer fills and is merged down to k several times."""
    from dlmscope.util.chunks import CANDIDATE_BUFFER
    from dlmscope.kernels.topk_select import chunked_topk
    g = torch.Generator().manual_seed(5)
    xc, W = torch.randn(9, 6, generator=g), torch.randn(50, 6, generator=g)
    b = torch.randn(50, generator=g)
    k, chunk = 3, 3
    assert 17 * k > CANDIDATE_BUFFER * k                     # 17 chunks of 3: the buffer must merge
    values, indices = chunked_topk(xc.to(DEV), W.to(DEV), b.to(DEV), k, chunk)
    ref = torch.relu(xc.double() @ W.double().T + b.double())
    torch.testing.assert_close(values.cpu().double().sort(-1).values, ref.topk(k).values.sort(-1).values,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.gather(1, indices.cpu()), values.cpu().double(), atol=1e-5, rtol=0)
