"""Acceptance rules: greedy against a direct check, rejection sampling statistically against the target; the
counter-based random numbers they draw on."""

import pytest
import torch

from specattn_runtime import rng
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
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    for step in range(trials):
        drafted = torch.multinomial(q, k, replacement=True, generator=gen)
        n, nxt = speculative_accept(drafted, q.expand(k, v), p.expand(k + 1, v), seed, step)
        first = int(drafted[0]) if n > 0 else nxt  # the first emitted token
        counts[first] += 1
    expected = p * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_DF4_P001, f"emitted {counts.tolist()} vs expected {expected.tolist()}: chi2 {chi2:.1f}"


def test_identical_distributions_always_accept(gen):
    p = torch.softmax(torch.randn(7, generator=gen), -1)
    for step in range(50):
        drafted = torch.multinomial(p, 4, replacement=True, generator=gen)
        assert speculative_accept(drafted, p.expand(4, 7), p.expand(5, 7), 11, step)[0] == 4


def test_logits_to_probs_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = logits_to_probs(logits, 1.0, top_p=0.8)
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(logits_to_probs(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    with pytest.raises(ValueError, match="temperature"):
        logits_to_probs(logits, 0.0)
    with pytest.raises(ValueError, match="top_p"):
        logits_to_probs(logits, 1.0, top_p=0.0)


def test_sample_follows_the_weights(gen):
    """The exponential race over hashed uniforms: frequencies match the (unnormalised) weights."""
    w = torch.rand(5, generator=gen) * 3
    w[2] = 0.0  # never drawn
    trials = 6000
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    counts = torch.bincount(torch.cat([rng.sample(w, seed, step, 3) for step in range(trials)]), minlength=5)
    assert counts[2] == 0
    keep = w > 0
    expected = (w / w.sum() * trials)[keep]
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, f"drawn {counts.tolist()} for weights {w.tolist()}: chi2 {chi2:.1f}"  # 3 df, p = 0.001


def test_uniforms_are_uniform_independent_and_repeatable(gen):
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    u = rng.uniform(seed, 5, 0, 20000, "cpu")
    assert u.dtype == torch.float32 and ((u > 0) & (u < 1)).all()
    hist = torch.histc(u, bins=10, min=0, max=1)
    chi2 = float(((hist - 2000) ** 2 / 2000).sum())
    assert chi2 < 27.88, f"histogram {hist.tolist()}"  # 9 df, p = 0.001
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.03  # neighbours uncorrelated
    assert torch.equal(u, rng.uniform(torch.tensor([seed]), torch.tensor([5]), 0, 20000, "cpu"))  # tensor form
    others = [rng.uniform(seed, 6, 0, 64, "cpu"), rng.uniform(seed, 5, 1, 64, "cpu"),
              rng.uniform(seed + 1, 5, 0, 64, "cpu")]
    assert all(not torch.equal(u[:64], o) for o in others), "step, slot and seed must each change the draw"
