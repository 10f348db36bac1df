"""Per-KV-head selection in the decode engine (mode ``draft``): the draft records one row per (mapped layer, draft KV
head), the select phase runs top-p per (sparse layer, target KV head) with that head's p, and the verification
reads one chunk list per KV head. Checked against the eager loop's per-head path token for token, against plain
greedy decoding with every p = 1, and the selection buffers against the sort-based reference.

On CPU the engine runs its phases eagerly (torch attention and selection; the Triton kernels in the interpreter
where the test says so); ``tests/test_engine_gpu.py`` runs the same engine captured on a GPU.
"""

import dataclasses
import os

import pytest
import torch

from specattn_runtime import SpecAttnRuntime
from specattn_runtime.engine import DecodeEngine, KVStore, SelfSpecEngine, SparsePlan, make_forward
from specattn_runtime.selection.reference import topp_mask_reference
from specattn_runtime.selection.triton_select import indices_to_mask

from artifact_factory import make_artifact
from test_engine import PROMPT, noisy_copy, same_run
from test_runtime_devices import tiny_llama

# target KV head -> draft KV head per target layer (row 0 dense): swapped, shared and identity maps
HEAD_MAP = [[-1, -1], [1, 0], [1, 1], [0, 1]]
# per-head p: heads of one layer differ, and one head of layer 3 reads everything
HEAD_P = [[1.0, 1.0], [0.5, 0.8], [0.7, 0.4], [1.0, 0.6]]


def head_artifact(head_p=HEAD_P):
    art = make_artifact(n_t=4, n_d=4, dense=1)
    return dataclasses.replace(art, layer_map=torch.tensor([-1, 1, 2, 3], dtype=torch.int32),
                               top_p=torch.tensor([1.0, 0.6, 0.6, 0.6]), head_map=torch.tensor(HEAD_MAP).int(),
                               top_p_head=torch.tensor(head_p).float(),
                               metadata={**art.metadata, "dense_layers": "1", "schema_version": "2"})


@pytest.fixture(scope="module")
def models():
    """(draft, target): tiny GQA Llamas (4 query heads, 2 KV heads), the draft a noisy copy (partial acceptance)."""
    target = tiny_llama(4, 2, "cpu")
    return noisy_copy(target, 0.01, 1), target


def runtimes(models, head_p=HEAD_P, **kw):
    draft, target = models
    art = head_artifact(head_p)
    return (SpecAttnRuntime(art, draft, target, engine="eager", exact_dense_shortcut=False, **kw),
            SpecAttnRuntime(art, draft, target, engine="static", exact_dense_shortcut=False, **kw))


SHORT = PROMPT[:150]  # 10 chunks: enough for top-p to leave some out, short enough for CI


@pytest.mark.parametrize("k, temperature, n_new", [(4, 0.0, 24), (3, 0.8, 16)])
def test_engine_equals_eager_per_head(models, k, temperature, n_new):
    eager, static = runtimes(models)
    assert eager.per_head and static.per_head and static.plan.per_head  # the default with a head map
    kw = dict(k=k, temperature=temperature, top_p=0.9, seed=11, eos_token_id=None)
    a, b = eager.generate(SHORT, n_new, **kw), static.generate(SHORT, n_new, **kw)
    same_run(a, b)
    assert b.stats.accepted_hist[0] > 0  # rejections happen: rollback is exercised
    read = b.stats.kv_read_fraction
    assert read[0] == 1.0 and all(0 < r < 1 for r in read[1:]), read  # per-head p < 1 reads less than p = 1


def test_all_p1_equals_plain_greedy(models):
    _, static = runtimes(models, head_p=[[1.0, 1.0]] * 4)
    assert static.plan.per_head  # every row goes through per-head selection and the sparse path
    out = static.generate(SHORT, 16, k=4, eos_token_id=None)
    with torch.no_grad():
        ids = torch.tensor([SHORT])
        ref = static.target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(SHORT):].tolist()
    assert out.tokens == ref
    assert out.stats.kv_read_fraction == pytest.approx([1.0] * 4)


def test_per_head_false_selects_per_layer(models):
    draft, target = models
    rt = SpecAttnRuntime(head_artifact(), draft, target, engine="static", per_head=False)
    assert not rt.per_head and not rt.plan.per_head and rt.plan.top_p == pytest.approx((0.6, 0.6, 0.6))


def assert_top_p_sets(got, scores, p, n_valid, recent_start, rel=1e-5):
    """Each row of ``got`` (bool ``[R, C]``) is a top-p set of its ``scores`` row with its own ``p``: inside the
    row's ``n_valid`` chunks, the sink and every chunk from ``recent_start`` on taken, the other chunks taken in score
    order until the mass reaches ``p`` of the total (float32 rounding: ``rel``), and no lowest taken score (with its
    ties, which the threshold search keeps whole where the sort reference cuts inside them) more than needed."""
    arange = torch.arange(scores.shape[1])
    for r in range(scores.shape[0]):
        valid = arange < int(n_valid[r])
        forced = valid & ((arange == 0) | (arange >= int(recent_start[r])))
        s, g = scores[r].double().cpu(), got[r].cpu()
        total = s[valid].sum()
        target = float(p[r]) * total
        assert not (g & ~valid).any() and g[forced].all(), f"row {r}: a chunk outside the row, or a forced one left"
        if float(p[r]) >= 1.0 or total <= 0:
            assert g[valid].all(), f"row {r}: p = 1 (or no mass) reads every valid chunk"
            continue
        free_got, free_left = g & ~forced, valid & ~forced & ~g
        if free_got.any() and free_left.any():
            assert s[free_got].min() >= s[free_left].max(), f"row {r}: not in score order"
        mass = s[g].sum()
        assert mass >= target - rel * total, f"row {r}: mass {mass} short of {target}"
        if free_got.any():
            lowest = s[free_got].min()
            assert mass - s[free_got & (s == lowest)].sum() < target + rel * total, f"row {r}: more than needed"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_selection_buffers_equal_the_reference(models, backend, gen):
    """The select phase on fresh random score rows: per (sparse layer, target KV head), the sort-based top-p of
    its mapped draft head's row with its own p, the sink and every chunk from the newest verified one kept."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":  # CPU models: the interpreter runs them
        pytest.skip("Triton kernels on CPU tensors need the interpreter (TRITON_INTERPRET=1)")
    draft, target = models
    rt = SpecAttnRuntime(head_artifact(), draft, target, engine="static", exact_dense_shortcut=False)
    store = KVStore({"target": target, "draft": draft}, 512)
    eng = DecodeEngine(target, store, rt.plan, 4, {}, backend=backend)
    c, n_chunks = rt.chunk_size, eng.scores.shape[-1]
    for length in (0, 37, 300, 507 - 4):
        eng.L.fill_(length)
        eng.scores.copy_(torch.softmax(torch.randn(eng.scores.shape, generator=gen) * 3, -1))
        eng._select()
        n_keys = length + eng.k + 1
        rows, p = [], []
        for r, (i, heads) in enumerate(zip(rt.plan.draft_layers, rt.plan.head_map)):
            for h, ph in zip(heads, rt.plan.top_p_head[r]):
                rows.append(eng.scores[rt.plan.record_layers.index(i), h])
                p.append(ph)
        n = len(rows)
        ref = topp_mask_reference(torch.stack(rows), torch.tensor(p), torch.full((n,), -(-n_keys // c)),
                                  recent_start=torch.full((n,), length // c))
        got = indices_to_mask(eng.idx, eng.count, n_chunks)
        assert_top_p_sets(got, torch.stack(rows), torch.tensor(p), torch.full((n,), -(-n_keys // c)),
                          torch.full((n,), length // c))
        # random rows have no ties: the float32 search picks the float64 sort's set (up to rounding, checked above)
        assert (got == ref).all(-1).float().mean() > 0.8
        sel = eng.verify_ctx.sparse[rt.plan.sparse_layers[1]]  # what layer 2's attention reads: its two heads
        assert sel[0].shape == (1, 2, n_chunks) and torch.equal(sel[1][0], eng.count[2:4])


def test_engine_per_head_through_triton_kernels(models):
    """Per-head recording in the attention kernel, per-row p in the selection kernel, per-head index lists in the
    verification kernel (the interpreter on CPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":  # CPU models: the interpreter runs them
        pytest.skip("Triton kernels on CPU tensors need the interpreter (TRITON_INTERPRET=1)")
    eager, static = runtimes(models, backend="triton", selection="triton")
    same_run(eager.generate(SHORT, 2, k=2, eos_token_id=None), static.generate(SHORT, 2, k=2, eos_token_id=None))


def test_plans_are_checked(models):
    draft, target = models
    with pytest.raises(ValueError, match="come together"):
        SparsePlan((1,), (0,), (0.5,), head_map=((0, 1),))
    with pytest.raises(ValueError, match="one row per sparse layer"):
        SparsePlan((1, 2), (0, 1), (0.5, 0.5), head_map=((0, 1),), top_p_head=((0.5, 0.5),))
    store = KVStore({"target": target, "draft": draft}, 64)
    with pytest.raises(ValueError, match="target has 2 KV heads"):
        DecodeEngine(target, store, SparsePlan((1,), (0,), (0.5,), head_map=((0, 1, 1),), top_p_head=((0.5,) * 3,)),
                     2, {})
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        DecodeEngine(target, store, SparsePlan((1,), (0,), (0.5,), head_map=((0, 2),), top_p_head=((0.5,) * 2,)), 2,
                     {})
    plan = SparsePlan((1,), (1,), (0.5,), head_map=((0, 1),), top_p_head=((0.5, 0.5),))
    with pytest.raises(ValueError, match="SelfSpecEngine selects one chunk set per layer"):
        SelfSpecEngine(target, KVStore({"target": target}, 64), plan, 2, {"target": make_forward(target)})
