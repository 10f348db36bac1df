"""Acceptance rules: greedy against a direct check, rejection sampling statistically against the target."""

import pytest
import torch

from specattn_runtime.sampling import greedy_accept, logits_to_probs, speculative_accept

CHI2_DF4_P001 = 18.47  # chi-square critical value, 4 degrees of freedom, p = 0.001


def test_greedy_accepts_the_agreeing_prefix():
    logits = torch.full((4, 6), -1.0)
    for i, t in enumerate([2, 5, 1, 3]):
        logits[i, t] = 1.0
    assert greedy_accept(torch.tensor([2, 5, 1]), logits) == (3, 3)  # all accepted + bonus
    assert greedy_accept(torch.tensor([2, 4, 1]), logits) == (1, 5)  # first mismatch: target's token
    assert greedy_accept(torch.tensor([0, 5, 1]), logits) == (0, 2)


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_emits_the_target_distribution(k, gen):
    """With position-independent p and q, every emitted token must follow p, whatever q is."""
    v, trials = 5, 6000
    p = torch.softmax(torch.randn(v, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(v, generator=gen) * 1.5, -1)
    counts = torch.zeros(v)
    for _ in range(trials):
        drafted = torch.multinomial(q, k, replacement=True, generator=gen)
        n, nxt = speculative_accept(drafted, q.expand(k, v), p.expand(k + 1, v), gen)
        first = int(drafted[0]) if n > 0 else nxt  # the first emitted token
        counts[first] += 1
    expected = p * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_DF4_P001, f"emitted {counts.tolist()} vs expected {expected.tolist()}: chi2 {chi2:.1f}"


def test_identical_distributions_always_accept(gen):
    p = torch.softmax(torch.randn(7, generator=gen), -1)
    for _ in range(50):
        drafted = torch.multinomial(p, 4, replacement=True, generator=gen)
        assert speculative_accept(drafted, p.expand(4, 7), p.expand(5, 7), gen)[0] == 4


def test_logits_to_probs_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = logits_to_probs(logits, 1.0, top_p=0.8)
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(logits_to_probs(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    with pytest.raises(ValueError, match="temperature"):
        logits_to_probs(logits, 0.0)
    with pytest.raises(ValueError, match="top_p"):
        logits_to_probs(logits, 1.0, top_p=0.0)
