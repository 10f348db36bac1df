"""The decode engine against the eager loop: device-side lengths, rollback by length, acceptance and sampling on
the device, prefix reuse. Same models, same prompt: the same tokens, the same per-step acceptance, the same KV
read. On CPU the engine runs its phases without CUDA graphs (the captured code path is the same functions); on a
GPU machine the same tests also run captured (``tests/test_engine_gpu.py``).
"""

import copy
import dataclasses
import os

import pytest
import torch

from specattn_runtime import SpecAttnRuntime

from artifact_factory import make_artifact
from test_runtime_devices import tiny_llama


def noisy_copy(model, sigma: float, seed: int):
    """A draft that agrees with ``model`` often but not always: its weights plus relative noise ``sigma``."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * sigma * p.std())
    return m


def pair(top_p: float, device: str = "cpu", **kw) -> tuple[SpecAttnRuntime, SpecAttnRuntime]:
    """(eager, static) runtimes over the same tiny GQA models: draft = noisy copy of the target (4 layers)."""
    art = make_artifact(n_t=4, n_d=4, dense=1)
    art = dataclasses.replace(art, layer_map=torch.tensor([-1, 1, 2, 3], dtype=torch.int32),
                              top_p=torch.tensor([1.0] + [top_p] * 3), metadata={**art.metadata, "dense_layers": "1"})
    target = tiny_llama(4, 2, device)
    draft = noisy_copy(target, 0.01, 1)
    return (SpecAttnRuntime(art, draft, target, engine="eager", exact_dense_shortcut=False, **kw),
            SpecAttnRuntime(art, draft, target, engine="static", exact_dense_shortcut=False, **kw))


def same_run(a, b):
    assert b.stats.engine == "static" and a.stats.engine == "eager"
    assert a.tokens == b.tokens
    assert a.stats.accepted_hist == b.stats.accepted_hist
    # the two paths record attention with different float operation orders: a chunk on the top-p boundary can
    # fall either way now and then, which moves the read share a little without changing a token
    assert a.stats.kv_read_fraction == pytest.approx(b.stats.kv_read_fraction, rel=0.02)


PROMPT = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_equals_eager_loop(k, temperature):
    eager, static = pair(0.6)
    kw = dict(k=k, temperature=temperature, top_p=0.9, seed=11, eos_token_id=None)
    a, b = eager.generate(PROMPT, 60, **kw), static.generate(PROMPT, 60, **kw)
    same_run(a, b)
    hist = b.stats.accepted_hist
    print(f"k={k} T={temperature}: accepted per step {hist}")
    assert sum(hist) == b.stats.steps and hist[0] > 0  # rejections happen: rollback is exercised
    if k == 4 and temperature == 0.0:
        assert all(h > 0 for h in hist), f"every acceptance length 0..k should occur here: {hist}"


def test_autoregressive_k0_equals_transformers_greedy():
    eager, static = pair(0.6)
    out = static.generate(PROMPT, 40, k=0, eos_token_id=None)
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        ref = static.target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert out.tokens == ref == eager.generate(PROMPT, 40, k=0, eos_token_id=None).tokens
    assert out.stats.kv_read_fraction == [1.0] * 4 and out.stats.accepted_hist == [out.stats.steps]


def test_prefix_reuse_and_capacity_growth():
    eager, static = pair(0.6)
    first = static.generate(PROMPT, 10, k=3, eos_token_id=None)
    store = static._caches.store
    assert store.prefix["target"] == PROMPT[:-1]
    longer = PROMPT + first.tokens + [7, 8, 9]  # shares the cached prompt: only the suffix is prefilled
    b = static.generate(longer, 20, k=3, eos_token_id=None)
    assert static._caches.store is store and store.prefix["target"] == longer[:-1]
    same_run(eager.generate(longer, 20, k=3, eos_token_id=None), b)
    huge = PROMPT * 8  # more than the first capacity: new caches, new engine
    c = static.generate(huge, 5, k=3, eos_token_id=None)
    assert static._caches.store is not store and static._caches.store.capacity >= len(huge) + 5 + 4
    same_run(eager.generate(huge, 5, k=3, eos_token_id=None), c)


def test_eos_and_max_tokens_stop_mid_step():
    eager, static = pair(0.6)
    ref = eager.generate(PROMPT, 30, k=4, eos_token_id=None).tokens
    eos = ref[17]
    out = static.generate(PROMPT, 30, k=4, eos_token_id=eos)
    assert out.tokens == ref[: ref.index(eos) + 1]
    assert static.generate(PROMPT, 7, k=4, eos_token_id=None).tokens == ref[:7]


def test_shared_caches_between_runtimes():
    eager, static = pair(0.6)
    dense_art = dataclasses.replace(static.artifact, top_p=torch.ones(4))
    other = SpecAttnRuntime(dense_art, static.draft, static.target, engine="static")
    static.generate(PROMPT, 4, k=2, eos_token_id=None)
    other.share_caches_with(static)
    out = other.generate(PROMPT, 12, k=2, eos_token_id=None)
    assert other._caches.store is static._caches.store
    ref = SpecAttnRuntime(dense_art, static.draft, static.target, engine="eager").generate(PROMPT, 12, k=2,
                                                                                          eos_token_id=None)
    same_run(ref, out)
    with pytest.raises(ValueError, match="same draft and target"):
        other.share_caches_with(SpecAttnRuntime(dense_art, tiny_llama(4, 9, "cpu"), static.target))


def test_engine_through_triton_kernels():
    """The kernels' device-length, recording and selection paths inside the engine (the interpreter on CPU)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need the interpreter (TRITON_INTERPRET=1)")
    eager, static = pair(0.6, backend="triton", selection="triton")
    prompt = PROMPT[:150]
    same_run(eager.generate(prompt, 8, k=3, eos_token_id=None), static.generate(prompt, 8, k=3, eos_token_id=None))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_one_token_prompt(temperature):
    """Nothing cached before the first token: the engine's first draft forward feeds it twice at position 0."""
    eager, static = pair(0.6)
    kw = dict(k=3, temperature=temperature, seed=2, eos_token_id=None)
    same_run(eager.generate([17], 30, **kw), static.generate([17], 30, **kw))
