"""The self-speculative decode engine (``SelfSpecEngine``): lossless, so its greedy tokens are the model's own greedy
tokens whatever the draft budget, and its sampled tokens follow the model's distribution.

On CPU the engine runs its phases eagerly (``graphs=False``, torch attention and selection); on a GPU machine the
same checks run captured, through the Triton kernels and compiled forwards (skipped without CUDA).
"""

import pytest
import torch

from specattn_runtime.engine import KVStore, SelfSpecEngine, make_forward, self_plan
from specattn_runtime.hooks import register

from test_runtime_devices import tiny_llama


def engine_for(model, n_keys: int, k: int, top_p: float, *, dense_layers: int = 1, sampling: str = "greedy",
               backend: str = "torch", graphs: bool = False, compile: bool = False, store: KVStore | None = None):
    n = model.config.num_hidden_layers
    store = store or KVStore({"target": model}, n_keys)
    plan = self_plan(range(dense_layers, n), [top_p] * (n - dense_layers))
    return SelfSpecEngine(model, store, plan, k, {"target": make_forward(model, compile)}, sampling=sampling,
                          backend=backend, graphs=graphs)


def self_generate(eng: SelfSpecEngine, ids: list[int], n_new: int, **start) -> tuple[list[int], list[int]]:
    """(tokens, accepted drafts per step)."""
    eng.capture()
    eng.store.prefill("target", ids[:-1])
    eng.start(len(ids) - 1, ids[-1], ids[-2] if len(ids) > 1 else None, **start)
    out, acc = [], []
    while len(out) < n_new:
        new = eng.step()
        acc.append(len(new) - 1)
        out += new
    return out[:n_new], acc


def greedy(model, ids: list[int], n_new: int) -> list[int]:
    with torch.no_grad():
        t = torch.tensor([ids], device=model.device)
        return model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n_new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()


PROMPT = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(4, 2, "cpu")


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("top_p", [1.0, 0.5, 0.05])
def test_tiny_model_greedy_equals_plain_greedy(tiny, k, top_p):
    ref = greedy(tiny, PROMPT, 48)
    eng = engine_for(tiny, 512, k, top_p)
    tokens, acc = self_generate(eng, PROMPT, 48)
    assert tokens == ref
    read = [s / len(acc) for s in eng.kv_read_sum()]
    print(f"k={k} p={top_p}: accepted per step {acc}, draft KV read {[f'{r:.2f}' for r in read]}")
    if top_p < 1:
        assert any(a < k for a in acc), "rejections should happen at a small budget: rollback is exercised"
        assert all(r < 0.95 for r in read), "the drafts should read a fraction of the keys"
    else:
        assert read == pytest.approx([1.0] * 3)


def test_one_token_prompt_and_full_acceptance(tiny):
    """Nothing cached at start; p = 1 drafts exactly what the verification computes: every draft accepted."""
    eng = engine_for(tiny, 128, 3, 1.0)
    tokens, acc = self_generate(eng, [17], 30)
    assert tokens == greedy(tiny, [17], 30)
    assert set(acc) == {3}


def test_plan_and_k_are_checked(tiny):
    store = KVStore({"target": tiny}, 64)
    fwd = {"target": make_forward(tiny)}
    with pytest.raises(ValueError, match="k >= 1"):
        SelfSpecEngine(tiny, store, self_plan([1, 2, 3], [0.5] * 3), 0, fwd)
    from specattn_runtime.engine import SparsePlan

    with pytest.raises(ValueError, match="draft_layers must equal sparse_layers"):
        SelfSpecEngine(tiny, store, SparsePlan((1, 2), (0, 0), (0.5, 0.5)), 2, fwd)


def test_seeded_sampling_follows_the_model(tiny):
    """Rejection sampling of sparse drafts emits the model's distribution: the first token after a prompt, over
    many seeds, against the model's own next-token probabilities (chi-square over the likeliest tokens)."""
    ids = PROMPT[:40]
    with torch.no_grad():
        p = torch.softmax(tiny(torch.tensor([ids])).logits[0, -1].double(), -1)
    p2 = None
    eng = engine_for(tiny, 128, 3, 0.05, sampling="sample")
    eng.store.prefill("target", ids[:-1])
    counts = torch.zeros_like(p)
    trials = 600
    second = torch.zeros_like(p)  # the second token too: drawn after a (partly) sparse-drafted first one
    for seed in range(trials):
        eng.start(len(ids) - 1, ids[-1], ids[-2], seed=seed, temperature=1.0)
        out = eng.step()
        while len(out) < 2:
            out += eng.step()
        counts[out[0]] += 1
        if out[0] == int(p.argmax()):
            second[out[1]] += 1
    top = p.argsort(descending=True)[:4]
    expected = torch.cat([p[top], (1 - p[top].sum()).view(1)]) * trials
    got = torch.cat([counts[top], (trials - counts[top].sum()).view(1)])
    chi2 = float(((got - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, f"first tokens {got.tolist()} vs expected {expected.tolist()}: chi2 {chi2:.1f}"  # 4 df
    with torch.no_grad():
        p2 = torch.softmax(tiny(torch.tensor([ids + [int(p.argmax())]])).logits[0, -1].double(), -1)
    n2 = second.sum()
    top2 = p2.argsort(descending=True)[:2]
    exp2 = torch.cat([p2[top2], (1 - p2[top2].sum()).view(1)]) * n2
    got2 = torch.cat([second[top2], (n2 - second[top2].sum()).view(1)])
    chi2 = float(((got2 - exp2) ** 2 / exp2).sum())
    assert chi2 < 13.82, f"second tokens {got2.tolist()} vs expected {exp2.tolist()}: chi2 {chi2:.1f}"  # 2 df


@pytest.mark.slow
@pytest.mark.parametrize("k", [4])  # k = 1 on this model: tests/test_selfspec.py (eager loop); the engine: tiny model
def test_shipped_model_greedy_equals_plain_greedy(quick_pair, k):
    """SmolLM2-135M on a real text, 64 tokens, two of its layers dense, budgets down to p = 0.02."""
    from pipelines import assets
    from pipelines.corpus import wiki_articles
    from specattn_runtime.models import load_causal_lm, load_tokenizer

    target = load_causal_lm(quick_pair[1], attn_implementation=register())
    text = wiki_articles(assets.fetch(assets.ENWIKI_BZ2))[11][1]
    ids = load_tokenizer(quick_pair[1])(text).input_ids[:700]
    ref = greedy(target, ids, 64)
    store = KVStore({"target": target}, 800)
    for top_p in (0.9, 0.3, 0.02):
        eng = engine_for(target, 800, k, top_p, dense_layers=2, store=store)
        tokens, acc = self_generate(eng, ids, 64)
        read = sum(eng.kv_read_sum()) / len(eng.kv_read_sum()) / len(acc)
        print(f"k={k} p={top_p}: mean accepted {sum(acc) / len(acc):.2f}, draft KV read {read:.2f}")
        assert tokens == ref, f"p={top_p}"


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("layout", ["mha-d128", "gqa-d64"])
def test_graphs_and_triton_greedy_equal_plain_greedy(layout):
    """Captured phases, Triton attention (recording in the kernel) and selection, compiled forwards."""
    from test_engine_gpu import models, prompt

    _, target = models(layout)
    ids = prompt(3000, seed=6)
    ref = greedy(target, ids, 40)
    store = KVStore({"target": target}, 3200)
    for k in (1, 4):
        for top_p in (1.0, 0.3):
            eng = engine_for(target, 3200, k, top_p, backend="triton", graphs=True, compile=k == 4, store=store)
            tokens, acc = self_generate(eng, ids, 40)
            assert eng.graphs, "the phases should be captured on CUDA"
            print(f"{layout} k={k} p={top_p}: accepted per step {acc}")
            assert tokens == ref, f"k={k} p={top_p}"
            tokens2, _ = self_generate(eng, ids, 40)  # graphs reused, prefix reused
            assert tokens2 == ref
