import itertools

import pytest
import torch

from specattn_runtime.selection import select_chunks


def brute_force_size(scores, p, n_valid, keep_sink=True, keep_recent=True):
    """Size of the smallest chunk set containing the forced chunks with mass >= p * total (float64)."""
    s = scores[:n_valid].double()
    total = s.sum()
    forced = {0, n_valid - 1} if keep_sink and keep_recent else set()
    free = [i for i in range(n_valid) if i not in forced]
    for k in range(len(free) + 1):
        for extra in itertools.combinations(free, k):
            if s[list(forced | set(extra))].sum() >= p * total:
                return len(forced) + k
    return n_valid


def check_invariants(scores, p, n_valid, mask):
    valid = torch.arange(scores.shape[1])[None] < n_valid[:, None]
    assert not (mask & ~valid).any(), "selected a chunk outside the causal window"
    assert mask[:, 0].all() and mask[torch.arange(len(n_valid)), n_valid - 1].all(), "sink/newest dropped"
    s = torch.where(valid, scores.double(), 0.0)
    kept = (s * mask).sum(-1)
    assert (kept >= p * s.sum(-1) * (1 - 1e-6)).all(), "selected mass below p"


@pytest.mark.parametrize("method", ["sort", "threshold"])
def test_matches_brute_force_on_small_rows(method, gen):
    for _ in range(60):
        c = int(torch.randint(2, 9, (), generator=gen))
        scores = torch.rand(1, c, generator=gen) ** 3
        n_valid = torch.randint(1, c + 1, (1,), generator=gen)
        p = float(torch.rand((), generator=gen)) * 0.98 + 0.01
        mask = select_chunks(scores, p, n_valid, method=method)
        check_invariants(scores, p, n_valid, mask)
        assert int(mask.sum()) == brute_force_size(scores[0], p, int(n_valid)), (scores, p, n_valid)


@pytest.mark.parametrize("shape", [(7, 63), (33, 257), (4, 1000)])
@pytest.mark.parametrize("peaked", [False, True])
def test_threshold_equals_sort_reference(shape, peaked, gen):
    rows, c = shape
    logits = torch.randn(rows, c, generator=gen) * (6.0 if peaked else 1.0)
    scores = torch.softmax(logits, -1)
    n_valid = torch.randint(1, c + 1, (rows,), generator=gen)
    p = torch.rand(rows, generator=gen) * 0.5 + 0.5
    ref = select_chunks(scores, p, n_valid, method="sort")
    fast = select_chunks(scores, p, n_valid, method="threshold")
    check_invariants(scores, p, n_valid, fast)
    # Continuous random inputs have no ties: the sets must be identical, not just equally large.
    mismatch = (ref != fast).any(-1)
    assert not mismatch.any(), f"{int(mismatch.sum())} rows differ"


def test_ties_keep_whole_tie_group_in_threshold_method():
    scores = torch.tensor([[0.1, 0.2, 0.2, 0.2, 0.2, 0.1]])
    mask = select_chunks(scores, 0.5, method="threshold")
    # forced chunks hold 0.2; one 0.2 chunk reaches 0.4, a second 0.6 >= 0.5: the threshold keeps all tied chunks
    assert mask.tolist() == [[True, True, True, True, True, True]]
    assert select_chunks(scores, 0.5, method="sort").sum() == 4


@pytest.mark.parametrize("method", ["sort", "threshold"])
def test_dense_cases(method):
    scores = torch.tensor([[0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    n_valid = torch.tensor([4, 3])
    mask = select_chunks(scores, torch.tensor([1.0, 0.9]), n_valid, method=method)
    assert mask[0].all(), "p = 1 is dense"
    assert mask[1].tolist() == [True, True, True, False], "a zero-mass row stays dense within its window"


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan")])
def test_bad_p_is_a_clear_error(p):
    with pytest.raises(ValueError, match="p must lie in"):
        select_chunks(torch.rand(2, 4), p)


def test_bad_inputs():
    with pytest.raises(ValueError, match="n_valid"):
        select_chunks(torch.rand(2, 4), 0.9, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="non-negative"):
        select_chunks(torch.tensor([[0.5, -0.1]]), 0.9)
    with pytest.raises(ValueError, match="unknown selection method"):
        select_chunks(torch.rand(2, 4), 0.9, method="bogus")
