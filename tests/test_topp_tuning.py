import pytest
import torch

from pipelines.topp_tuning import LayerRows, recall_and_kv, tune_p


def rows_with_signal(gen, n=64, c=20, noise=0.5):
    """Draft and target attention that agree up to noise, as real aligned layers do."""
    base = torch.randn(n, c, generator=gen) * 2
    t = torch.softmax(base, -1)
    d = torch.softmax(base + noise * torch.randn(n, c, generator=gen), -1)
    n_valid = torch.full((n,), c)
    return LayerRows(d, t, n_valid, n_valid * 16)


@pytest.mark.parametrize("budget", [0.8, 0.9, 0.95, 0.99])
def test_tuned_p_is_smallest_meeting_budget(budget, gen):
    rows = rows_with_signal(gen)
    p, recall, kv = tune_p(rows, budget, chunk_size=16, tol=1e-4)
    assert recall >= budget
    assert (recall, kv) == recall_and_kv(rows, p, 16)
    # brute force on a fine grid: no p more than the tolerance below the tuned one meets the budget
    for q in torch.linspace(0.001, p - 2e-4, 400).tolist():
        assert recall_and_kv(rows, q, 16)[0] < budget, f"p={q} < {p} also meets the budget"


def test_recall_is_monotone_in_p(gen):
    rows = rows_with_signal(gen)
    stats = [recall_and_kv(rows, p, 16) for p in torch.linspace(0.05, 1.0, 40).tolist()]
    assert all(a[0] <= b[0] + 1e-12 and a[1] <= b[1] + 1e-12 for a, b in zip(stats, stats[1:]))
    assert stats[-1] == (pytest.approx(1.0), pytest.approx(1.0))


@pytest.mark.parametrize("budget", [0.0, -1.0, 1.01])
def test_budget_out_of_range(budget, gen):
    with pytest.raises(ValueError, match="budget"):
        tune_p(rows_with_signal(gen), budget, 16)
