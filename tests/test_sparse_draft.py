"""Sparse drafting (issue 24): after each step's first, dense draft forward, the draft layers with p < 1 read only
the top-p chunks of that forward's attention in the step's other forwards.

Checked three ways: the decode engine (single sequence and batched) against the eager loop token for token; the
eager loop's drafts against an oracle that runs transformers' own eager attention with an explicit key mask built
by sorting (no code shared with the runtime's selection or attention); and with every draft p = 1, against dense
drafting exactly.
"""

import copy
import dataclasses

import pytest
import torch

from specattn_runtime import SpecAttnRuntime
from specattn_runtime.pooling import pool_to_chunks

from artifact_factory import make_artifact
from test_engine import PROMPT, noisy_copy, same_run
from test_engine_per_head import HEAD_MAP, HEAD_P
from test_runtime_devices import tiny_llama

DRAFT_P = [1.0, 0.5, 0.7, 0.4]  # layer 0 drafts densely; the others read what their first forward selects
SHORT = PROMPT[:200]  # 13 chunks: top-p leaves some out


def sparse_draft_artifact(draft_p=DRAFT_P, per_head: bool = False, target_p: float = 0.6):
    art = make_artifact(n_t=4, n_d=4, dense=1)
    heads = dict(head_map=torch.tensor(HEAD_MAP).int(), top_p_head=torch.tensor(HEAD_P).float()) if per_head else {}
    return dataclasses.replace(art, layer_map=torch.tensor([-1, 1, 2, 3], dtype=torch.int32),
                               top_p=torch.tensor([1.0] + [target_p] * 3), draft_top_p=torch.tensor(draft_p).float(),
                               metadata={**art.metadata, "dense_layers": "1"}, **heads)


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(4, 2, "cpu")
    return noisy_copy(target, 0.01, 1), target


def runtimes(models, art, exact_dense_shortcut=False, **kw):
    draft, target = models
    return tuple(SpecAttnRuntime(art, draft, target, engine=e, exact_dense_shortcut=exact_dense_shortcut, **kw)
                 for e in ("eager", "static"))


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("k, temperature, guidance", [(4, 0.0, "first"), (3, 0.8, "first"), (4, 0.0, "all")])
def test_engine_equals_eager_with_sparse_drafting(models, per_head, k, temperature, guidance):
    eager, static = runtimes(models, sparse_draft_artifact(per_head=per_head), sparse_draft_guidance=guidance)
    assert static.plan.sparse_forwards_guide == (guidance == "all")
    assert static.plan.draft_sparse_layers == (1, 2, 3) and static.per_head == per_head
    kw = dict(k=k, temperature=temperature, top_p=0.9, seed=5, eos_token_id=None)
    a, b = eager.generate(SHORT, 24, **kw), static.generate(SHORT, 24, **kw)
    same_run(a, b)
    fa, fb = a.stats.draft_kv_read_fraction, b.stats.draft_kv_read_fraction
    assert fa == pytest.approx(fb, rel=0.02)
    assert fb[0] == 1.0 and all(0 < f < 0.9 for f in fb[1:]), f"the sparse-drafting layers read less: {fb}"
    assert b.stats.summary()["draft_kv_read_mean"] < 1.0


def test_every_draft_p_one_is_dense_drafting(models):
    """Draft p just below 1 (so that the layers take the sparse path, keeping every chunk with mass) drafts what
    dense drafting drafts: the same acceptance, step by step. The target verifies densely here (p = 1), so its
    tokens cannot depend on the draft's recorded rows."""
    dense_e, dense_s = runtimes(models, sparse_draft_artifact(target_p=1.0), True, sparse_draft=False)
    assert not dense_s.plan.draft_sparse_layers and not dense_s.plan.sparse_layers
    near_one = runtimes(models, sparse_draft_artifact([0.999999] * 4, target_p=1.0), True)
    assert near_one[1].plan.draft_sparse_layers == (0, 1, 2, 3)
    kw = dict(k=4, temperature=0.0, eos_token_id=None)
    ref = dense_s.generate(SHORT, 20, **kw)
    assert ref.stats.draft_kv_read_fraction == [1.0] * 4  # dense drafting reports full reads
    for rt in (dense_e, *near_one):
        out = rt.generate(SHORT, 20, **kw)
        assert out.tokens == ref.tokens and out.stats.accepted_hist == ref.stats.accepted_hist


def test_guidance_changes_what_the_target_reads(models):
    """The two guidance choices give the target different rows (so the option is not a no-op), and a bad value is
    refused by name."""
    first, every = (runtimes(models, sparse_draft_artifact(), sparse_draft_guidance=g)[1] for g in ("first", "all"))
    kw = dict(k=4, temperature=0.0, eos_token_id=None)
    a, b = first.generate(SHORT, 24, **kw), every.generate(SHORT, 24, **kw)
    assert a.stats.kv_read_fraction != b.stats.kv_read_fraction
    with pytest.raises(ValueError, match="sparse_draft_guidance"):
        runtimes(models, sparse_draft_artifact(), sparse_draft_guidance="some")


def test_older_artifacts_draft_densely(models):
    art = dataclasses.replace(sparse_draft_artifact(), draft_top_p=None,
                              metadata={**sparse_draft_artifact().metadata, "schema_version": "2"})
    rt = SpecAttnRuntime(art, *models, engine="static")
    assert rt.plan.draft_sparse_layers == () and not rt.draft_sparse_layers
    out = rt.generate(SHORT, 8, k=3, eos_token_id=None)
    assert out.stats.draft_kv_read_fraction == [1.0] * 4


# -- the oracle ---------------------------------------------------------------------------------------------------

def _oracle_top_p(row: torch.Tensor, p: float, keep_from: int) -> torch.Tensor:
    """bool [C]: the sink, every chunk from ``keep_from`` on, and the fewest other chunks (largest first, by a
    sort) whose mass with the forced ones reaches ``p`` of the row's total."""
    c = row.numel()
    keep = torch.zeros(c, dtype=torch.bool)
    keep[0] = True
    keep[keep_from:] = True
    need = p * float(row.sum())
    have = float(row[keep].sum())
    for i in torch.argsort(row, descending=True).tolist():
        if have >= need:
            break
        if not keep[i]:
            keep[i] = True
            have += float(row[i])
    return keep


@torch.no_grad()
def test_sparse_drafts_match_a_masked_attention_oracle(models):
    """One step's k drafts, greedy, computed by hand: transformers' eager attention over the prompt's cache, the
    first forward's attention probabilities pooled per chunk, a sort-based top-p per layer, then the later
    forwards with a 4D mask hiding the unselected keys in those layers only (a per-layer mask through a forward
    hook on each attention module). The runtime's eager loop drafts the same tokens, and its draft logits agree."""
    draft, target = models
    k, c = 4, 16
    eager, _ = runtimes(models, sparse_draft_artifact())
    drafted = _drafts_of_first_step(eager, SHORT, k)
    ref = copy.deepcopy(draft)
    ref.set_attn_implementation("eager")  # transformers' own attention, probabilities returned
    n = len(SHORT)
    L = n - 1  # positions cached before the step; the step's first forward is [SHORT[-2], SHORT[-1]] at L-1, L
    ids = torch.tensor([SHORT])
    full = ref(ids, output_attentions=True)
    # the first forward's last query is position L: its attention over keys 0..L, per layer, head-averaged
    n_keys = L + k
    n_chunks = -(-n_keys // c)
    keep_from = (L - 1) // c
    key_ok = {}
    for layer, p in enumerate(DRAFT_P):
        if p >= 1.0:
            continue
        row = full.attentions[layer][0, :, -1].float().mean(0)  # [L + 1]
        pooled = torch.zeros(n_chunks)
        pooled[: -(-(L + 1) // c)] = pool_to_chunks(row[None], c)[0]
        sel = _oracle_top_p(pooled, p, keep_from)
        key_ok[layer] = sel.repeat_interleave(c)[:n_keys]
    toks = list(SHORT)
    oracle = [int(full.logits[0, -1].argmax())]
    oracle_logits, dense_logits = [full.logits[0, -1]], [full.logits[0, -1]]
    toks.append(oracle[0])
    for s in range(1, k):
        hooks = []
        m = len(toks)
        for layer, attn in enumerate(ref.model.layers):
            if layer in key_ok:
                hooks.append(attn.self_attn.register_forward_pre_hook(_masking_hook(key_ok[layer], L + 1, m),
                                                                      with_kwargs=True))
        try:
            logits = ref(torch.tensor([toks])).logits[0, -1]
        finally:
            for h in hooks:
                h.remove()
        oracle.append(int(logits.argmax()))
        oracle_logits.append(logits)
        dense_logits.append(ref(torch.tensor([toks])).logits[0, -1])
        toks.append(oracle[-1])
    assert [int(x.argmax()) for x in drafted] == oracle
    for s, (got, want, dense) in enumerate(zip(drafted, oracle_logits, dense_logits)):
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-4, f"draft {s}: runtime logits differ from the oracle's by {err:.2e}"
        if s:  # the masks matter: reading everything gives other logits (the test could not fail otherwise)
            assert (dense - want).abs().max() / want.abs().max() > 1e-3


def _masking_hook(key_ok: torch.Tensor, first_sparse: int, m: int):
    """A forward pre-hook replacing the layer's causal mask: the queries from ``first_sparse`` on (the drafts after
    the step's first forward) see only the selected keys (causally); the earlier ones, computed densely at run
    time (prefill, the first draft forward), keep the full causal mask."""
    def hook(module, args, kwargs):
        mask = torch.full((m, m), float("-inf")).triu(1)
        allowed = key_ok[:m]  # it covers every key the step's last draft sees
        mask[first_sparse:, ~allowed] = float("-inf")
        kwargs["attention_mask"] = mask[None, None]
        return args, kwargs
    return hook


def _drafts_of_first_step(rt, prompt, k):
    """The logits of the k drafts of the eager loop's first step (read through the draft's own forward calls)."""
    seen = []
    orig = rt.draft.forward

    def spy(*a, **kw):
        res = orig(*a, **kw)
        if kw.get("specattn_state") is not None and kw["specattn_state"].mode == "draft":
            seen.append(res.logits[0, -1].clone())
        return res

    rt.draft.forward = spy
    try:
        rt.generate(prompt, 1, k=k, temperature=0.0, eos_token_id=None)
    finally:
        rt.draft.forward = orig
    return seen[:k]


@pytest.mark.parametrize("per_head, temperature", [(False, 0.0), (True, 0.8)])
def test_batched_sparse_drafting_equals_each_prompt_alone(models, per_head, temperature):
    """The batched engine's draft selection, one row block per slot, over ragged lengths and through continuous
    batching (3 slots for 4 prompts: a slot is reloaded and the live slots compacted)."""
    from test_batch import all_pages_free, prompts, same_outputs

    eager, static = runtimes(models, sparse_draft_artifact(per_head=per_head),
                             sparse_draft_guidance="all" if per_head else "first")
    ps = prompts(21, (200, 37, 150, 1))
    kw = dict(k=4, temperature=temperature, top_p=0.9, seed=7, eos_token_id=None)
    alone = eager.generate_batch(ps, 20, **kw)
    batched = static.generate_batch(ps, 20, max_batch=3, **kw)
    same_outputs(alone, batched)
    for a, b in zip(alone, batched):
        assert a.stats.draft_kv_read_fraction == pytest.approx(b.stats.draft_kv_read_fraction, rel=0.02)
    assert batched[0].stats.draft_kv_read_fraction[1] < 0.9  # the long prompt's sparse-drafting layers read less
    all_pages_free(static)
