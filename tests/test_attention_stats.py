import math

import pytest
import torch

from pipelines.attention_stats import kl_matrix, query_positions, smooth, valid_chunks
from specattn_runtime.pooling import chunk_token_counts, pool_to_chunks


def random_rows(layers, n, c, n_valid, gen):
    x = torch.rand(layers, n, c, generator=gen) ** 4
    x = torch.where(torch.arange(c)[None, None] < n_valid[None, :, None], x, 0.0)
    return x / x.sum(-1, keepdim=True)


def test_kl_matrix_matches_pairwise_loop(gen):
    n, c = 23, 9
    n_valid = torch.randint(1, c + 1, (n,), generator=gen)
    t, d = random_rows(3, n, c, n_valid, gen), random_rows(5, n, c, n_valid, gen)
    got = kl_matrix(t, d, n_valid, eps=1e-4)
    for j in range(3):
        for i in range(5):
            total = 0.0
            for r in range(n):
                v = int(n_valid[r])
                a = (t[j, r, :v].double() + 1e-4) / (t[j, r, :v].double() + 1e-4).sum()
                b = (d[i, r, :v].double() + 1e-4) / (d[i, r, :v].double() + 1e-4).sum()
                total += float((a * (a / b).log()).sum())
            assert got[j, i].item() == pytest.approx(total / n, rel=1e-5, abs=1e-7)


def test_kl_of_identical_rows_is_zero_and_positive_otherwise(gen):
    n_valid = torch.full((10,), 6)
    t = random_rows(2, 10, 6, n_valid, gen)
    kl = kl_matrix(t, torch.stack([t[1], t[0]]), n_valid)
    assert kl[0, 1] < 1e-6 and kl[1, 0] < 1e-6
    assert kl[0, 0] > 1e-3 and kl[1, 1] > 1e-3


def test_smooth_stays_in_window(gen):
    n_valid = torch.tensor([1, 3])
    s = smooth(torch.zeros(2, 4), n_valid, 1e-6)
    assert s[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.allclose(s[1, :3], torch.full((3,), 1 / 3, dtype=torch.float64)) and s[1, 3] == 0


def test_pooling_keeps_mass_and_counts_tokens(gen):
    probs = torch.softmax(torch.randn(3, 37, generator=gen), -1)
    pooled = pool_to_chunks(probs, 16)
    assert pooled.shape == (3, 3)
    assert torch.allclose(pooled.sum(-1), torch.ones(3))
    assert torch.allclose(pooled[:, 2], probs[:, 32:].sum(-1))
    counts = chunk_token_counts(torch.tensor([37, 16, 1]), 3, 16)
    assert counts.tolist() == [[16, 16, 5], [16, 0, 0], [1, 0, 0]]


def test_query_positions_are_decode_like():
    pos = query_positions(1000, 50)
    assert pos.min() >= math.ceil(0.1 * 1000) and pos.max() == 999 and len(pos) == 50
    assert valid_chunks(torch.tensor([0, 15, 16]), 16).tolist() == [1, 1, 2]
    with pytest.raises(ValueError, match="no decode positions"):
        query_positions(1, 4, prefill_fraction=1.0)
