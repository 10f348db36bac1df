"""StreamingLLM and Quest chunk selections against brute-force constructions on small random cases."""

import itertools

import pytest
import torch

from pipelines.baselines import chunk_key_bounds, quest_mask, streaming_mask
from pipelines.evaluate import p_for_recall


def _budgets(t, cs, gen):
    own = torch.arange(t) // cs
    return torch.stack([torch.randint(1, int(o) + 2, (1,), generator=gen)[0] for o in own])


@pytest.mark.parametrize("t,cs", [(37, 4), (64, 16), (5, 8)])
def test_streaming_keeps_sink_and_newest_chunks(t, cs, gen):
    budget = _budgets(t, cs, gen)
    got = streaming_mask(budget, cs)
    for q in range(t):
        own, b = q // cs, int(budget[q])
        want = {0} | set(range(max(own - (b - 1) + 1, 0), own + 1)) if b > 1 else {own}
        assert set(got[q].nonzero().flatten().tolist()) == want, (q, b)


def test_chunk_bounds_hold_every_key(gen):
    k = torch.randn(2, 21, 5, generator=gen)
    lo, hi = chunk_key_bounds(k, 4)
    for c in range(6):
        block = k[:, c * 4 : (c + 1) * 4]
        assert torch.equal(lo[:, c], block.amin(1)) and torch.equal(hi[:, c], block.amax(1))


@pytest.mark.parametrize("h,hkv,t,cs", [(4, 2, 29, 4), (3, 3, 40, 8)])
def test_quest_picks_top_bounds_per_head(h, hkv, t, cs, gen):
    q, k = torch.randn(h, t, 6, generator=gen), torch.randn(hkv, t, 6, generator=gen)
    budget = _budgets(t, cs, gen)
    got = quest_mask(q, k, budget, cs)
    rep = h // hkv
    for head, query in itertools.product(range(h), range(t)):
        own = query // cs
        bounds = []
        for c in range(own):  # brute force: the bound is max over the box corners, elementwise
            block = k[head // rep, c * cs : (c + 1) * cs]
            lo, hi = block.amin(0), block.amax(0)
            bound = torch.maximum(q[head, query] * lo, q[head, query] * hi).sum()
            # it really bounds every key of the chunk
            assert (block @ q[head, query] <= bound + 1e-5).all()
            bounds.append((float(bound), c))
        chosen = {own} | {c for _, c in sorted(bounds, reverse=True)[: int(budget[query]) - 1]}
        assert set(got[head, query].nonzero().flatten().tolist()) == chosen, (head, query)


def test_p_for_recall_interpolates_the_smallest_p():
    grid = torch.tensor([0.5, 0.8, 0.9, 1.0])
    recall = torch.tensor([0.70, 0.90, 0.96, 1.0])
    assert p_for_recall(grid, recall, 0.5) == 0.5
    assert p_for_recall(grid, recall, 0.9) == pytest.approx(0.8)
    assert p_for_recall(grid, recall, 0.93) == pytest.approx(0.85)
    assert p_for_recall(grid, torch.tensor([0.7, 0.8, 0.9, 0.95]), 0.99) == 1.0
    with pytest.raises(ValueError, match="budget"):
        p_for_recall(grid, recall, 1.5)
