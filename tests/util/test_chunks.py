"""dlmscope.util.chunks.over_chunks against a dense float64 top-k: selections that start off the chunk grid,
AuxK-style keep masks, full candidate buffers merged in place, and one product per chunk."""
import pytest
import torch

from dlmscope.util.chunks import CANDIDATE_BUFFER, merge_topk, over_chunks, select_topk


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 200])
def test_over_chunks_equals_dense_topk(chunk):
    g = torch.Generator().manual_seed(chunk)
    B, n = 6, 90
    pre_full = torch.randn(B, n, generator=g, dtype=torch.float64)
    keep = torch.rand(40, generator=g) < 0.5
    # two segments (the second starts off every chunk grid but 1), and an AuxK selection of the second
    selections = [(0, 50, 4, None), (50, 90, 20, None), (50, 90, 5, keep)]
    products = []

    def product(c0, c1):
        products.append((c0, c1))
        return pre_full[:, c0:c1]

    out = over_chunks(product, B, n, selections, select_topk, merge_topk, chunk, torch.float64, pre_full.device)
    assert products == [(c0, min(c0 + chunk, n)) for c0 in range(0, n, chunk)]  # each chunk's product once
    relu = pre_full.clamp_min(0)
    for (start, stop, k, mask), (values, indices) in zip(selections, out):
        assert values.shape == (B, k) and indices.shape == (B, k) and values.dtype == torch.float64
        segment = relu[:, start:stop] if mask is None else relu[:, start:stop].masked_fill(~mask, 0)
        expect = segment.topk(k).values
        torch.testing.assert_close(values.sort(-1).values, expect.sort(-1).values, rtol=0, atol=0)
        torch.testing.assert_close(segment.gather(1, indices), values, rtol=0, atol=0)
        for row in indices.tolist():
            assert len(set(row)) == k and 0 <= min(row) and max(row) < stop - start


def test_full_buffer_is_merged_not_grown():
    """k = 2 over 45 chunks of 2: the buffer never exceeds CANDIDATE_BUFFER * k columns."""
    g = torch.Generator().manual_seed(1)
    pre_full = torch.randn(3, 90, generator=g)
    widths = []

    def select(pre, k, keep, vals, ids, col, id_offset):
        widths.append(vals.shape[1])
        select_topk(pre, k, keep, vals, ids, col, id_offset)

    [(values, _)] = over_chunks(lambda c0, c1: pre_full[:, c0:c1], 3, 90, [(0, 90, 2, None)], select, merge_topk, 2,
                                torch.float32, pre_full.device)
    assert set(widths) == {CANDIDATE_BUFFER * 2}
    torch.testing.assert_close(values.sort(-1).values, pre_full.clamp_min(0).topk(2).values.sort(-1).values)
