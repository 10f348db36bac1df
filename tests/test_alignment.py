import itertools

import pytest
import torch

from pipelines.alignment import align_layers, map_cost


def brute_force(kl: torch.Tensor, dense: int) -> float:
    n_t, n_d = kl.shape
    best = float("inf")
    for path in itertools.combinations_with_replacement(range(n_d), n_t - dense):  # all non-decreasing maps
        best = min(best, map_cost(kl, [-1] * dense + list(path)))
    return best


def assert_valid_optimal(kl, dense, got):
    assert len(got) == kl.shape[0]
    assert got[:dense] == [-1] * dense
    sparse = got[dense:]
    assert all(0 <= i < kl.shape[1] for i in sparse)
    assert all(a <= b for a, b in zip(sparse, sparse[1:])), f"not monotone: {got}"
    assert map_cost(kl, got) == pytest.approx(brute_force(kl, dense), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n_t,n_d", [(4, 6), (6, 4), (5, 5), (1, 3), (3, 1), (7, 3)])
@pytest.mark.parametrize("dense", [0, 1, 2])
def test_dp_matches_brute_force_on_random_matrices(n_t, n_d, dense, gen):
    if dense > n_t:
        pytest.skip("more dense layers than target layers")
    for _ in range(40):
        kl = torch.rand(n_t, n_d, generator=gen, dtype=torch.float64)
        assert_valid_optimal(kl, dense, align_layers(kl, dense))


def test_dp_matches_brute_force_with_ties(gen):
    for _ in range(100):
        kl = torch.randint(0, 3, (4, 6), generator=gen).double()  # many equal-cost maps
        assert_valid_optimal(kl, 0, align_layers(kl, 0))


@pytest.mark.parametrize("planted", [[0, 1, 2, 3], [0, 0, 3, 5], [2, 2, 2, 2], [1, 3, 4, 5], [5, 5, 5, 5]])
def test_dp_recovers_planted_map(planted, gen):
    kl = 1.0 + torch.rand(4, 6, generator=gen, dtype=torch.float64)
    for j, i in enumerate(planted):
        kl[j, i] = 0.01 * torch.rand((), generator=gen, dtype=torch.float64)
    assert align_layers(kl, 0) == planted


def test_dense_layers_all_and_errors():
    kl = torch.rand(3, 2)
    assert align_layers(kl, 3) == [-1, -1, -1]
    with pytest.raises(ValueError, match="dense_layers"):
        align_layers(kl, 4)
    with pytest.raises(ValueError, match="NaN"):
        align_layers(torch.tensor([[float("nan"), 1.0]]), 0)
    with pytest.raises(ValueError, match="non-empty"):
        align_layers(torch.zeros(0, 3), 0)


@pytest.mark.parametrize("n_t,n_d,dense,also", [(6, 4, 1, [3]), (5, 5, 0, [0, 2]), (7, 3, 2, [2, 4, 6]),
                                                (4, 3, 0, [0, 1, 2, 3])])
def test_also_dense_layers_match_brute_force(n_t, n_d, dense, also, gen):
    """Layers named in ``also_dense`` get -1 and do not constrain the others: the map over the remaining layers is
    the brute-force optimum among maps non-decreasing over those layers alone."""
    keep = [j for j in range(n_t) if j >= dense and j not in also]
    for _ in range(20):
        kl = torch.rand(n_t, n_d, generator=gen, dtype=torch.float64)
        got = align_layers(kl, dense, also)
        assert [j for j in range(n_t) if got[j] < 0] == sorted(set(range(dense)) | set(also))
        sparse = [got[j] for j in keep]
        assert all(0 <= i < n_d for i in sparse) and all(a <= b for a, b in zip(sparse, sparse[1:]))
        best = min((map_cost(kl[keep], list(p)) for p in itertools.combinations_with_replacement(range(n_d),
                                                                                                 len(keep))),
                   default=0.0)
        assert map_cost(kl, got) == pytest.approx(best, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="outside the target"):
        align_layers(torch.rand(3, 2), 0, [3])
