"""The preallocated KV cache gives the same logits as transformers' DynamicCache, through appends and rollbacks."""

import pytest
import torch
from transformers import DynamicCache

from specattn_runtime.cache import preallocated_cache

from test_runtime_devices import tiny_llama


@torch.no_grad()
def test_matches_dynamic_cache_through_crops(gen):
    model = tiny_llama(3, 5, "cpu")
    ids = torch.randint(0, 512, (1, 40), generator=gen)
    outs = []
    for cache in (DynamicCache(config=model.config), preallocated_cache(3, 64)):
        logits = [model(ids[:, :20], past_key_values=cache).logits]
        pos = 20
        for step, (n_in, n_drop) in enumerate([(5, 3), (1, 0), (4, 4), (6, 2), (3, 0)]):
            logits.append(model(ids[:, pos : pos + n_in], past_key_values=cache).logits)
            cache.crop(-n_drop)  # speculative rollback: the dropped positions are re-fed next
            pos += n_in - n_drop
            assert cache.get_seq_length() == pos
        outs.append(torch.cat(logits, 1))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_capacity_is_enforced():
    cache = preallocated_cache(1, 4)
    k = torch.zeros(1, 2, 3, 8)
    cache.update(k, k, 0)
    with pytest.raises(ValueError, match="capacity 4"):
        cache.update(k, k, 0)
    with pytest.raises(ValueError, match="capacity"):
        preallocated_cache(1, 0)
