"""Sparse drafting measured teacher-forced (pipelines/draft_tuning.py): the block selection against its definition,
the region pass against the draft run forward by forward with hand-made masks, the tuning rule, the sparse draft's
rows in the evaluation, and the calibration parameters it adds."""

import pytest
import torch
import transformers
from transformers import DynamicCache

from pipelines import draft_tuning as D
from pipelines import self_tuning as S
from pipelines import sparse_eval
from pipelines.calibrate import check_params
from specattn_runtime import capture
from specattn_runtime.capture import register_attention
from specattn_runtime.models import load_causal_lm
from specattn_runtime.pooling import pool_to_chunks
from specattn_runtime.selection import select_chunks

CS = 16


def _definition(rows, t, q, k, p, per_head, first_row):
    """Chunks of every region query, one query at a time, from the runtime's contract (sort reference)."""
    hkv, _, c = rows.shape
    out = torch.zeros(1 if not per_head else hkv, q, c, dtype=torch.bool)
    for i in range(q):
        pos = t - q + i
        e = t - q + (i // k) * k  # block start: forward 0
        if pos == e:
            out[:, i, : pos // CS + 1] = True
            continue
        row = rows[:, e - first_row]
        row = row if per_head else row.mean(0, keepdim=True)
        n_valid = min(-(-(e + k) // CS), c)
        sel = select_chunks(row, p, torch.full((row.shape[0],), n_valid), method="sort",
                            keep_recent=n_valid - (e - 1) // CS)
        out[:, i] = sel
        out[:, i, pos // CS + 1 :] = False
    return out


@pytest.mark.parametrize("per_head", [True, False])
def test_draft_guided_chunks_equal_the_per_query_definition(gen, per_head):
    hkv, t, q, k = 3, 157, 30, 4  # ragged: partial last chunk and last block, blocks crossing chunk borders
    c = -(-t // CS)
    rows = torch.rand(hkv, q + k + 1, c, generator=gen) ** 4
    for r in range(q + k + 1):  # a query's row only has mass on keys it can see
        rows[:, r, (t - (q + k + 1) + r) // CS + 1 :] = 0
    got = D.draft_guided_chunks(rows, t, q, k, 0.6, CS, per_head, method="sort")
    want = _definition(rows, t, q, k, 0.6, per_head, t - (q + k + 1))
    assert torch.equal(got, want)
    assert (~got[:, D.sparse_forwards(q, k)]).any(), "nothing left out: the test shows nothing"


# --- the region pass against the draft run forward by forward -------------------------------------------------

_HAND = {"masks": {}, "probs": {}}


def _hand_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention by hand (GQA by repeating K/V), causal; a layer in ``_HAND["masks"]`` (bool
    ``[G, C]``) reads only those chunks; the last query's probabilities are kept per layer."""
    h, hkv, tq, tk = query.shape[1], key.shape[1], query.shape[2], key.shape[2]
    k_, v_ = key.repeat_interleave(h // hkv, 1), value.repeat_interleave(h // hkv, 1)
    logits = (query @ k_.transpose(-1, -2)) * scaling  # [1, H, Tq, Tk]
    allowed = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)[None]  # [1, Tq, Tk]
    sel = _HAND["masks"].get(module.layer_idx)
    if sel is not None:
        keys = sel.repeat_interleave(CS, -1)[:, :tk].repeat_interleave(h // sel.shape[0], 0)  # [H, Tk]
        allowed = allowed & keys[:, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed[None], float("-inf")), -1)
    _HAND["probs"][module.layer_idx] = probs[0, :, -1]  # [H, Tk]
    return (probs @ v_).transpose(1, 2).contiguous(), None


def _hand_row(probs, hkv, per_head):
    """Per-KV-head (or head-averaged) chunk-pooled row of one query's probabilities ``[H, Tk]``."""
    h = probs.shape[0]
    rows = pool_to_chunks(probs.view(hkv, h // hkv, -1).mean(1), CS)
    return rows if per_head else rows.mean(0, keepdim=True)


@pytest.fixture(scope="module")
def drafts(quick_pair):
    d = quick_pair[0]
    return (load_causal_lm(d, attn_implementation=S.register()),
            load_causal_lm(d, attn_implementation=register_attention("test_hand_masks", _hand_attention, "sdpa")))


@pytest.mark.slow
@pytest.mark.parametrize("per_head", [True, False])
@torch.no_grad()
def test_region_pass_equals_the_draft_run_by_hand(drafts, gen, per_head):
    """Every block: forward 0 dense over the first E + 1 tokens, its rows pooled by hand and selected with the sort
    reference; forwards 1 .. k - 1 one token at a time on the cache, the sparse layers masked to their chunks. The
    teacher-forced logits, reads and recorded rows equal those forwards'."""
    tf, hand = drafts
    t, q, k = 107, 9, 3
    top_p = {1: 0.3, 4: 0.5, 7: 0.2}  # the others dense
    ids = torch.randint(100, 20000, (t,), generator=gen)
    dense = S.dense_pass(tf, ids, q, k, list(range(10)), CS)
    chunks = D.chunks_for(dense, top_p, per_head, method="sort")
    rows: dict = {}
    tf_logits, read = S.region_pass(tf, dense, chunks, rows=rows)
    hkv = tf.config.num_key_value_heads
    c = -(-t // CS)
    differs = False
    for e in D.block_starts(t - q, q, k).tolist():
        _HAND["masks"].clear()
        cache = DynamicCache(config=hand.config)
        logits = hand(ids[None, : e + 1], past_key_values=cache, use_cache=True).logits[0, -1]
        torch.testing.assert_close(tf_logits[e - (t - q)], logits, atol=2e-4, rtol=0)
        n_valid = min(-(-(e + k) // CS), c)
        sel = {}
        for j, p in top_p.items():
            row = torch.zeros(hkv if per_head else 1, n_valid)
            r = _hand_row(_HAND["probs"][j], hkv, per_head)
            row[:, : r.shape[-1]] = r
            sel[j] = select_chunks(row, p, method="sort", keep_recent=n_valid - (e - 1) // CS)
        for s in range(1, min(k, t - e)):
            _HAND["masks"].update(sel)
            pos = e + s
            logits = hand(ids[None, pos : pos + 1], past_key_values=cache, use_cache=True).logits[0, -1]
            i = pos - (t - q)
            torch.testing.assert_close(tf_logits[i], logits, atol=2e-4, rtol=0, msg=f"position {pos}")
            differs |= bool((logits - dense.logits[i]).abs().max() > 1e-2)
            for j in range(10):  # the rows a sparse forward records: its mass over the chunks it read
                want = pool_to_chunks(_HAND["probs"][j].view(hkv, -1, pos + 1).mean(1), CS)
                torch.testing.assert_close(rows[j][:, i, : want.shape[-1]], want, atol=1e-5, rtol=0)
            for j, m in sel.items():  # keys read: the selection's, over the visible ones
                keys = m.repeat_interleave(CS, -1)[:, : pos + 1].double()
                assert read[j][i].item() == pytest.approx(keys.mean(-1).mean().item(), abs=1e-9)
    assert differs, "the sparse drafts equal the dense draft: nothing tested"


# --- the tuning rule ------------------------------------------------------------------------------------------

def test_choose_takes_the_least_read_within_the_budget():
    cands = [{"mean_accepted_length": 2.0, "draft_kv_read_all_layers": 1.0},
             {"mean_accepted_length": 1.95, "draft_kv_read_all_layers": 0.6},
             {"mean_accepted_length": 1.7, "draft_kv_read_all_layers": 0.3},
             {"mean_accepted_length": 1.96, "draft_kv_read_all_layers": 0.6}]
    assert D.choose(cands, 2.0, 0.0) == 0
    assert D.choose(cands, 2.0, 0.03) == 3  # equal reads: the longer accepted length
    assert D.choose(cands, 2.0, 0.2) == 2
    with pytest.raises(ValueError, match="no candidate"):
        D.choose(cands[1:], 2.0, 0.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        D.choose(cands, 2.0, 1.0)


def _tiny_llama(seed, layers=3):
    cfg = transformers.LlamaConfig(vocab_size=12, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
                                   max_position_embeddings=512)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_tuning_rule_on_a_synthetic_pair(gen):
    """Two random models: the rule keeps the dense layers dense, meets its budget with the least draft KV read
    among the measured candidates, and a re-measurement of its choice gives the numbers it reported."""
    draft, target = _tiny_llama(1), _tiny_llama(2, layers=2)
    draft.set_attn_implementation(S.register())
    q, k = 24, 4
    windows = [D.draft_window(draft, target, torch.randint(0, 12, (160,), generator=gen), q, k, [0, 1, 2], CS)
               for _ in range(2)]
    grid = torch.tensor([0.3, 0.6, 0.9, 1.0])
    for budget in (0.0, 0.5):
        res = D.tune_draft(draft, windows, 3, 1, grid, budget, per_head=True, progress=False)
        assert res["top_p"][0] == 1.0 and res["layers"] == [1, 2]
        dense_len = res["dense"]["mean_accepted_length"]
        ok = [c for c in res["candidates"] if c["mean_accepted_length"] >= (1 - budget) * dense_len - 1e-12]
        best = res["candidates"][res["best"]]
        assert best["top_p"] == res["top_p"]
        assert best["draft_kv_read_all_layers"] == min(c["draft_kv_read_all_layers"] for c in ok)
        again = D.summarize(D.measure(draft, windows, 3, dict(enumerate(res["top_p"])), True), k, 3)
        assert again["mean_accepted_length"] == pytest.approx(best["mean_accepted_length"])
        assert again["draft_kv_read_all_layers"] == pytest.approx(best["draft_kv_read_all_layers"])
    assert any(c["draft_kv_read_sparse_forwards"] < 0.9 for c in res["candidates"]), "no sparse candidate"
    # reads: the k - 1 sparse forwards of every block read less than all k forwards on average
    sparse = [c for c in res["candidates"] if min(c["top_p"]) < 1]
    assert all(c["draft_kv_read_sparse_forwards"] < c["draft_kv_read_all_layers"] < 1 for c in sparse)


# --- the measurement against the runtime --------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [True, False])
@torch.no_grad()
def test_teacher_forced_acceptance_equals_the_runtime(per_head):
    """On text the target wrote itself (its greedy continuation), the runtime's first step after a prompt of
    ``E + 1`` tokens (eager loop, dense verification, sparse drafting at the artifact's draft p) accepts exactly
    as many drafts as the teacher-forced measurement scores for the block starting at ``E``: a draft accepted so
    far was the text's token, so both drafted from the same context and the same chunks."""
    import copy
    import dataclasses

    from specattn_runtime import SpecAttnRuntime
    from test_engine import PROMPT, noisy_copy
    from test_runtime_devices import tiny_llama
    from test_sparse_draft import DRAFT_P, sparse_draft_artifact

    k = 4
    target = tiny_llama(4, 2, "cpu")
    draft = noisy_copy(target, 0.03, 1)
    art = sparse_draft_artifact(per_head=per_head, target_p=1.0)
    if per_head:  # dense verification: every head's p is 1 too
        art = dataclasses.replace(art, top_p_head=torch.ones_like(art.top_p_head))
    rt = SpecAttnRuntime(art, draft, target, engine="eager", exact_dense_shortcut=False)
    text = PROMPT[:150] + rt.generate(PROMPT[:150], 80, k=0, eos_token_id=None).tokens  # the target's greedy text
    tf_draft = copy.deepcopy(draft)
    tf_draft.set_attn_implementation(S.register())
    runtime, measured, sparse_moved = [], [], False
    for e in (160, 171, 183, 192, 204, 217):
        out = rt.generate(text[: e + 1], 1, k=k, eos_token_id=None)  # one step: its accepted drafts
        runtime.append(out.stats.accepted)
        w = D.draft_window(tf_draft, target, torch.tensor(text[: e + k]), k, k, list(range(4)), CS)  # block at e
        assert w.target_logits.argmax(-1).tolist() == text[e + 1 : e + k + 1]  # the target's own text
        stats = D.measure(tf_draft, [w], 4, dict(enumerate(DRAFT_P)), per_head)
        measured.append(int(stats["greedy_len"]) - 1)
        sparse_moved |= stats["same_as_dense"][1:] != [1.0] * (k - 1) or \
            not torch.equal(S.region_pass(tf_draft, w.dense, D.chunks_for(w.dense, dict(enumerate(DRAFT_P)),
                                                                          per_head))[0], w.dense.logits)
    assert runtime == measured
    assert 0 < sum(runtime) < k * len(runtime), f"no rejection or no acceptance: {runtime}"
    assert sparse_moved, "the sparse drafts equal the dense draft: nothing tested"


# --- evaluation: the target's selection from the sparse draft's rows ------------------------------------------

@pytest.mark.slow
@torch.no_grad()
def test_evaluation_with_the_sparse_draft_rows(quick_pair, gen):
    d, t = quick_pair
    draft = load_causal_lm(d, attn_implementation=capture.register())
    target = load_causal_lm(t, attn_implementation=sparse_eval.register())
    ids = torch.randint(100, 20000, (90,), generator=gen)
    prefill, k = 20, 4
    # every draft p = 1: the sparse draft's rows are the dense draft's (what the dense-draft rows select on)
    rec = capture.AttentionRecorder(torch.arange(prefill, 90), CS, per_kv_head=True)
    draft(ids[None], specattn_recorder=rec, use_cache=False)
    full = sparse_eval._sparse_draft_rows(draft, ids, prefill, sparse_eval.Method(
        "x", "specattn_head", draft_top_p=(1.0,) * 10, draft_k=k), CS)
    assert draft.config._attn_implementation == capture.ATTN_NAME  # switched back
    for j in range(10):
        torch.testing.assert_close(full[j], rec.rows_kv[j][0], atol=1e-5, rtol=0)
    layer_map = [-1, -1] + [min(j, 9) for j in range(2, 30)]
    p = tuple(1.0 if i < 0 else 0.8 for i in layer_map)
    dp = (1.0,) + (0.3,) * 9
    methods = [sparse_eval.Method("dense", "dense"), sparse_eval.Method("s", "specattn", p),
               sparse_eval.Method("s-sd", "specattn", p, draft_top_p=dp, draft_k=k)]
    rows = sparse_eval.summarize([sparse_eval.evaluate_window(target, draft, ids, layer_map, methods, CS, prefill)],
                                 methods, layer_map)
    assert rows["s-sd"]["sparse_draft"] and not rows["s"]["sparse_draft"]
    assert rows["s-sd"]["perplexity"] > 1 and 0 < rows["s-sd"]["kv_reduction_sparse_layers"] < 1
    assert rows["s-sd"]["step_nll"] != rows["s"]["step_nll"], "the sparse draft selected exactly as the dense one"


@pytest.mark.parametrize("params,match", [
    (dict(draft_acceptance_budget=1.0), r"draft_acceptance_budget .* must lie in \[0, 1\)"),
    (dict(draft_acceptance_budget=-0.1), "draft_acceptance_budget"),
    (dict(draft_dense_layers=-1), "draft_dense_layers must be >= 0"),
    (dict(draft_k=1), "draft_k .* must be >= 2"),
    (dict(queries_per_window=2), "region queries"),
])
def test_bad_sparse_draft_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        check_params(**params)
    check_params(**{**params, "sparse_draft": False})  # they do not apply without sparse drafting
