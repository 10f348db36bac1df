"""Teacher-forced sparse evaluation equals step-by-step decoding through the runtime's sparse attention."""

import pytest
import torch
from transformers import DynamicCache

from pipelines import sparse_eval
from pipelines.sparse_eval import Method, PassMasks, token_mask, topp_chunks
from specattn_runtime import capture, hooks
from specattn_runtime.models import load_causal_lm

pytestmark = pytest.mark.slow
CS, T, PREFILL = 16, 90, 20  # ragged: the last chunk is partial


@pytest.fixture(scope="module")
def targets(quick_pair):
    """The real target twice: with the evaluation attention and with the runtime's attention."""
    _, t = quick_pair
    return (load_causal_lm(t, attn_implementation=sparse_eval.register()),
            load_causal_lm(t, attn_implementation=hooks.register()))


def test_token_mask_is_causal_chunk_expansion(gen):
    chunks = torch.rand(37, 3, generator=gen) > 0.5
    m = token_mask(chunks, 16)
    for t in range(37):
        for s in range(37):
            assert m[t, s] == (s <= t and bool(chunks[t, s // 16]))


def test_blockwise_nll_equals_log_softmax(gen):
    logits, ids = torch.randn(11, 50, generator=gen) * 4, torch.randint(0, 50, (15,), generator=gen)
    ref = -torch.log_softmax(logits[:-1].double(), -1).gather(-1, ids[5:, None]).squeeze(-1)
    torch.testing.assert_close(sparse_eval._nll(logits, ids, 4, block=3), ref, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_one_pass_equals_token_by_token_decoding(targets, gen):
    target_eval, target_rt = targets
    ids = torch.randint(100, 20000, (T,), generator=gen)
    n_layers = target_eval.config.num_hidden_layers
    masks = PassMasks(CS)
    for j in range(2, n_layers):  # random peaked "draft" rows, a different p per layer
        rows = torch.softmax(torch.randn(T, -(-T // CS), generator=gen) * 3, -1)
        masks.chunks[j] = topp_chunks(rows, float(torch.rand(1, generator=gen)) * 0.6 + 0.3, PREFILL, CS)
    assert any((~m[PREFILL:]).any() for m in masks.chunks.values()), "test needs real sparsity"
    one_pass = target_eval(ids[None], specattn_eval=masks, use_cache=False).logits[0]

    cache = DynamicCache(config=target_rt.config)
    target_rt(ids[None, :PREFILL], past_key_values=cache, use_cache=True)  # dense prefill
    steps = []
    for t in range(PREFILL, T):
        c = t // CS + 1
        st = hooks.StepState("verify", CS, chunk_masks={j: m[t : t + 1, :c] for j, m in masks.chunks.items()},
                             backend="torch")
        steps.append(target_rt(ids[None, t : t + 1], past_key_values=cache, use_cache=True,
                               specattn_state=st).logits[0, -1])
    steps = torch.stack(steps)
    err = (one_pass[PREFILL:] - steps).abs().max() / steps.abs().max()
    assert torch.isfinite(steps).all() and err < 1e-4, f"relative error {err:.2e}"
    # and the sparsity mattered: dense logits differ
    dense = target_eval(ids[None], use_cache=False).logits[0]
    assert (dense[PREFILL:] - one_pass[PREFILL:]).abs().max() > 1e-3


@torch.no_grad()
def test_evaluate_window_accounts_kv_and_matches_budgets(quick_pair, targets, gen):
    draft = load_causal_lm(quick_pair[0], attn_implementation=capture.register())
    target_eval, _ = targets
    ids = torch.randint(100, 20000, (T,), generator=gen)
    layer_map = [-1, -1] + [min(j, 9) for j in range(2, 30)]
    p = tuple(1.0 if i < 0 else 0.6 for i in layer_map)
    methods = [Method("dense", "dense"), Method("s", "specattn", p), Method("o", "oracle", p),
               Method("st", "streaming", match="s"), Method("q", "quest", match="s")]
    res = sparse_eval.evaluate_window(target_eval, draft, ids, layer_map, methods, CS, PREFILL)
    rows = sparse_eval.summarize([res], methods, layer_map)
    assert rows["dense"]["perplexity_increase"] == 0 and rows["dense"]["kv_reduction_all_layers"] == 0
    for name in ("s", "st", "q"):  # matched budgets: identical keys read (no ties among random bounds)
        assert rows[name]["kv_reduction_sparse_layers"] == pytest.approx(rows["s"]["kv_reduction_sparse_layers"])
    assert 0 < rows["s"]["kv_reduction_all_layers"] < rows["s"]["kv_reduction_sparse_layers"] < 1
    assert all(len(r["step_nll"]) == T - PREFILL - 1 for r in rows.values())

    # the passes run the decode queries over a cached dense prefill: equal to one uncached pass over the whole
    # text with the same selections (dense before the prefill), for a mask method and for Quest (chosen inside)
    rec = capture.AttentionRecorder(torch.arange(T), CS, layers=set(layer_map[2:]))
    draft(ids[None], specattn_recorder=rec, use_cache=False)
    whole = PassMasks(CS, chunks={j: topp_chunks(rec.rows[i][0], 0.6, PREFILL, CS)
                                  for j, i in enumerate(layer_map) if i >= 0})
    logits = target_eval(ids[None], specattn_eval=whole, use_cache=False).logits[0, PREFILL:]
    torch.testing.assert_close(sparse_eval._nll(logits, ids, PREFILL), res["s"].nll, rtol=1e-4, atol=1e-4)
    n_chunks = torch.arange(T) // CS + 1
    quest = PassMasks(CS, quest_budget={j: torch.cat([n_chunks[:PREFILL], m[PREFILL:].sum(-1)])
                                        for j, m in whole.chunks.items()})
    logits = target_eval(ids[None], specattn_eval=quest, use_cache=False).logits[0, PREFILL:]
    torch.testing.assert_close(sparse_eval._nll(logits, ids, PREFILL), res["q"].nll, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prefill"):
        sparse_eval.evaluate_window(target_eval, draft, ids, layer_map, methods, CS, T)
    with pytest.raises(ValueError, match="earlier"):
        sparse_eval.evaluate_window(target_eval, draft, ids, layer_map, [Method("q", "quest", match="s")], CS, PREFILL)


@pytest.mark.parametrize("arch", ["mistral-window-1kv", "gemma2-softcap-d256", "llama-d256-1kv"])
@torch.no_grad()
def test_oracle_per_kv_head(arch):
    """One chunk set per KV head: with one KV head it is the head-averaged oracle exactly; with every chunk kept
    it is dense; Quest matched to it reads the same keys on average."""
    from test_variants import eager_model, ids, with_attention

    model = eager_model(arch)
    target, draft = with_attention(model, sparse_eval.register()), with_attention(model, capture.register())
    p = (1.0, 0.6, 0.6)
    methods = [Method("dense", "dense"), Method("all", "oracle_head", (1.0, 1.0, 1.0)),
               Method("oracle", "oracle", p), Method("head", "oracle_head", p),
               Method("quest", "quest", match="head")]
    res = sparse_eval.evaluate_window(target, draft, ids(5)[0], [-1, 0, 1], methods, 16, 20)
    torch.testing.assert_close(res["all"].nll, res["dense"].nll, rtol=1e-4, atol=1e-4)
    assert res["head"].read.sum() < res["dense"].read.sum()
    if model.config.num_key_value_heads == 1:
        torch.testing.assert_close(res["head"].nll, res["oracle"].nll)
        assert torch.equal(res["head"].read, res["oracle"].read)
    # Quest picks per head with the per-query mean of the oracle's per-head counts, rounded: within half a chunk
    # per scored query (49 of them) of the oracle's chunks
    assert torch.all((res["quest"].chunks - res["head"].chunks).abs() <= 0.5 * 49)
