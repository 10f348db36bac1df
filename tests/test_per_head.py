"""Per-KV-head selection (mode ``draft``, schema 2): head alignment, the artifact's head tensors, per-head sparse
verification against step-by-step decoding, the runtime on the real pair, calibration and evaluation."""

import dataclasses
import itertools
import json

import pytest
import torch
from transformers import DynamicCache

from pipelines import sparse_eval
from pipelines.alignment import align_heads
from pipelines.sparse_eval import Method, PassMasks, topp_chunks
from specattn_runtime import SpecAttnRuntime, hooks, load_artifact, save_artifact
from specattn_runtime.artifact import ArtifactError, validate_artifact
from specattn_runtime.models import load_causal_lm

from test_runtime import N_NEW, greedy_reference, pair_artifact, prompt_ids  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow
CS, T, PREFILL = 16, 90, 20


def test_head_alignment_is_the_brute_force_best(gen):
    for _ in range(20):
        kl = torch.rand(int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 5, (1,),
                        generator=gen)), generator=gen)
        heads = align_heads(kl)
        best = min(itertools.product(range(kl.shape[1]), repeat=kl.shape[0]),
                   key=lambda hs: float(sum(kl[g, h] for g, h in enumerate(hs))))
        assert sum(kl[g, h] for g, h in enumerate(heads)) == pytest.approx(sum(kl[g, h] for g, h in enumerate(best)))
    with pytest.raises(ValueError, match="NaN"):
        align_heads(torch.tensor([[float("nan")]]))


def per_head_artifact(d, t, head_p: float, gen=None):
    """The test pair's artifact with a head map (each target KV head guided by some draft head) and per-head p."""
    art = pair_artifact(d, t, 0.9)
    dense = art.layer_map == -1
    heads = torch.randint(0, 3, (30, 3), generator=gen) if gen is not None else torch.arange(3).repeat(30, 1)
    head_map = torch.where(dense[:, None], -1, heads).int()
    top_p = torch.where(dense[:, None], 1.0, head_p).expand(30, 3).contiguous().float()
    md = dict(art.metadata, schema_version="2")
    return dataclasses.replace(art, head_map=head_map, top_p_head=top_p, metadata=md)


def test_artifact_head_tensors_round_trip_and_are_checked(quick_pair, tmp_path, gen):
    d, t = quick_pair
    art = per_head_artifact(d, t, 0.7, gen)
    back = load_artifact(save_artifact(art, tmp_path / "h.safetensors"))
    assert back.per_head and torch.equal(back.head_map, art.head_map) and torch.equal(back.top_p_head, art.top_p_head)
    v1 = dataclasses.replace(pair_artifact(d, t, 0.9), metadata={**art.metadata, "schema_version": "1"})
    assert not load_artifact(save_artifact(v1, tmp_path / "v1.safetensors")).per_head  # old files: head-averaged
    bad_map = art.head_map.clone()
    bad_map[0, 0] = 1  # a dense layer with a head
    for broken, match in [(dict(head_map=bad_map), "dense layers"), (dict(top_p_head=None), "come together"),
                          (dict(top_p_head=art.top_p_head * 2), r"\(0, 1\]"),
                          (dict(metadata={**art.metadata, "schema_version": "1"}), "schema_version 2")]:
        with pytest.raises(ArtifactError, match=match):
            validate_artifact(dataclasses.replace(art, **broken))


@pytest.fixture(scope="module")
def target_pair(quick_pair):
    _, t = quick_pair
    return (load_causal_lm(t, attn_implementation=sparse_eval.register()),
            load_causal_lm(t, attn_implementation=hooks.register()))


@torch.no_grad()
def test_per_head_one_pass_equals_token_by_token_decoding(target_pair, gen):
    """The evaluation's per-head masks and the runtime's per-head sparse verification: the same logits."""
    target_eval, target_rt = target_pair
    ids = torch.randint(100, 20000, (T,), generator=gen)
    h, hkv = target_eval.config.num_attention_heads, target_eval.config.num_key_value_heads
    per_kv = {}
    for j in range(2, 30):  # random peaked rows per KV head, different p per head
        per_kv[j] = torch.stack([topp_chunks(torch.softmax(torch.randn(T, -(-T // CS), generator=gen) * 3, -1),
                                             float(torch.rand(1, generator=gen)) * 0.6 + 0.3, PREFILL, CS)
                                 for _ in range(hkv)])  # [Hkv, T, C]
    masks = PassMasks(CS, chunks={j: m.repeat_interleave(h // hkv, dim=0) for j, m in per_kv.items()})
    one_pass = target_eval(ids[None], specattn_eval=masks, use_cache=False).logits[0]
    cache = DynamicCache(config=target_rt.config)
    target_rt(ids[None, :PREFILL], past_key_values=cache, use_cache=True)
    steps = []
    for t in range(PREFILL, T):
        c = t // CS + 1
        st = hooks.StepState("verify", CS, chunk_masks={j: m[None, :, t, :c] for j, m in per_kv.items()})
        steps.append(target_rt(ids[None, t : t + 1], past_key_values=cache, use_cache=True,
                               specattn_state=st).logits[0, -1])
    steps = torch.stack(steps)
    err = (one_pass[PREFILL:] - steps).abs().max() / steps.abs().max()
    assert torch.isfinite(steps).all() and err < 1e-4, f"relative error {err:.2e}"
    shared = PassMasks(CS, chunks={j: m.any(0) for j, m in per_kv.items()})  # one set per layer: differs
    assert (target_eval(ids[None], specattn_eval=shared, use_cache=False).logits[0] - one_pass).abs().max() > 1e-3


def test_runtime_per_head_selection(quick_pair, prompt_ids, greedy_reference, tmp_path, gen):  # noqa: F811
    d, t = quick_pair
    full = save_artifact(per_head_artifact(d, t, 1.0, gen), tmp_path / "full.safetensors")
    rt = SpecAttnRuntime.from_artifact(full, draft=d, target=t, exact_dense_shortcut=False)
    assert rt.per_head
    assert rt.generate(prompt_ids, N_NEW, k=4, eos_token_id=None).tokens == greedy_reference  # exact when all read
    sparse = save_artifact(per_head_artifact(d, t, 0.6, gen), tmp_path / "sparse.safetensors")
    rt = SpecAttnRuntime.from_artifact(sparse, draft=d, target=t)
    read = rt.generate(prompt_ids, 24, k=4, eos_token_id=None).stats.kv_read_fraction
    assert all(0 < r < 1 for r in read[2:]), read
    averaged = SpecAttnRuntime.from_artifact(sparse, draft=d, target=t, per_head=False)
    assert not averaged.per_head
    static = SpecAttnRuntime.from_artifact(sparse, draft=d, target=t, engine="static")
    assert static.per_head and static.plan.per_head  # the decode engine selects per KV head too
    with pytest.raises(ValueError, match="needs an artifact with a head map"):
        SpecAttnRuntime(pair_artifact(d, t, 0.9), rt.draft, rt.target, per_head=True)
    beyond = per_head_artifact(d, t, 0.6)
    beyond.head_map[5, 0] = 7  # the draft has 3 KV heads
    with pytest.raises(ValueError, match="beyond the draft's 3"):
        SpecAttnRuntime(beyond, rt.draft, rt.target)


def test_calibration_writes_the_head_map(calibrated_quick, quick_pair):
    art = load_artifact(calibrated_quick)
    assert art.per_head and tuple(art.head_map.shape) == (30, 3)
    sparse = art.layer_map >= 0
    assert (art.head_map[sparse] >= 0).all() and (art.head_map[sparse] < 3).all()
    quality = art.info("holdout_quality")
    assert 0 < quality["per_head"]["kv_reduction_all_layers"] < 1 and quality["perplexity_sparse_head"] > 1
    d, t = quick_pair
    rt = SpecAttnRuntime.from_artifact(calibrated_quick, draft=d, target=t)
    assert rt.per_head and rt.generate([1, 2, 3, 4, 5], 8, k=3).stats.new_tokens == 8


def test_evaluation_has_per_head_rows(quick_evaluation):
    methods = json.loads(open(quick_evaluation).read())["methods"]
    head = next(n for n, r in methods.items() if r["kind"] == "specattn_head")
    for kind in ("quest", "streaming"):  # at its chunk counts: the same keys on average
        row = next(r for r in methods.values() if r["kind"] == kind and r["match"] == head)
        assert row["kv_reduction_all_layers"] == pytest.approx(methods[head]["kv_reduction_all_layers"], abs=0.01)


def test_full_runs_match_quest_and_streaming_to_every_per_head_point():
    """A full evaluation's per-head curve: each point is followed by Quest and StreamingLLM at its chunk counts
    (a matched method must come after the one it copies); quick runs keep the calibrated row only."""
    from artifact_factory import make_artifact

    from pipelines.evaluate import HEAD_CURVE_P, build_methods

    art = make_artifact(n_t=6, n_d=4, dense=2)
    dense = art.layer_map == -1
    art = dataclasses.replace(art, head_map=torch.where(dense[:, None], -1, 0).expand(6, 2).int(),
                              top_p_head=torch.where(dense[:, None], 1.0, 0.9).expand(6, 2).float(),
                              metadata={**art.metadata, "schema_version": "2"})
    assert 0.96 not in HEAD_CURVE_P
    for quick, n_points in ((True, 1), (False, 1 + len(HEAD_CURVE_P) + 1)):
        methods = build_methods(art, (0.96,), (0.85,), quick=quick)
        head = [i for i, m in enumerate(methods) if m.kind == "specattn_head"]
        assert len(head) == n_points
        for i in head:
            assert {(m.kind, m.match) for m in methods[i + 1 : i + 3]} == {("quest", methods[i].name),
                                                                           ("streaming", methods[i].name)}
        rows = {m.x for m in methods if m.kind == "specattn_head" and m.in_table}
        assert rows == ({0.95} if quick else {0.95, 0.96})  # the calibrated row (recall 0.95) and the global p given
        assert len({m.name for m in methods}) == len(methods)
