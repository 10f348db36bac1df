"""Self-speculation (artifact mode ``self``): lossless against plain decoding of the shipped model, sampling that
follows the model, the teacher-forced measurement against the runtime, calibration through a real Prefect flow,
and clear errors for the wrong models or modes."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import transformers

from pipelines import self_tuning as S
from pipelines.calibrate_self import uniform_artifact
from specattn_runtime import SpecAttnRuntime, hooks, save_artifact
from specattn_runtime.artifact import ArtifactError, validate_artifact
from specattn_runtime.fingerprint import model_fingerprint, tokenizer_hash
from specattn_runtime.selection import select_chunks
from specattn_runtime.selfspec import select_per_kv_head

pytestmark = pytest.mark.slow
N_NEW = 64


def self_artifact(model_dir, n_layers: int, top_p: float, dense: int = 2):
    """A mode ``self`` artifact: every layer after the first ``dense`` guided by itself at one p."""
    return uniform_artifact(n_layers, top_p, dense, model_dir)


@pytest.fixture(scope="module")
def prompts(quick_pair):
    from pipelines import assets
    from pipelines.corpus import wiki_articles
    from specattn_runtime.models import load_tokenizer

    tok = load_tokenizer(quick_pair[1])
    arts = wiki_articles(assets.fetch(assets.ENWIKI_BZ2))
    return [tok(" ".join(a[1] for a in arts[i : i + 4])).input_ids[:n] for i, n in ((3, 700), (40, 400))]


@pytest.fixture(scope="module")
def greedy_refs(quick_pair, prompts):
    from specattn_runtime.models import load_causal_lm

    target = load_causal_lm(quick_pair[1])
    refs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    return refs


@pytest.fixture(scope="module")
def self_artifacts(quick_pair, tmp_path_factory):
    t = quick_pair[1]
    root = tmp_path_factory.mktemp("self")
    return {p: save_artifact(self_artifact(t, 30, p), root / f"self{p}.safetensors") for p in (0.9, 0.5, 0.05)}


# budgets from mid to tiny and k 1 / 4 / 8 (p 0.9, nearly dense, added no path and ~20 s of CI)
@pytest.mark.parametrize("p,k", [(0.5, 8), (0.05, 4), (0.05, 1)])
def test_greedy_self_speculation_is_plain_greedy_decoding(quick_pair, self_artifacts, prompts, greedy_refs, p, k):
    rt = SpecAttnRuntime.from_artifact(self_artifacts[p], target=quick_pair[1])
    reads = []
    for prompt, ref in zip(prompts, greedy_refs):
        out = rt.generate(prompt, N_NEW, k=k, eos_token_id=None)
        first = next((i for i, (a, b) in enumerate(zip(out.tokens, ref)) if a != b), None)
        assert out.tokens == ref, f"p={p} k={k}: first difference at token {first}"
        st = out.stats
        assert st.steps < N_NEW or k == 1 or p < 0.5, "self-speculation accepted nothing"
        reads.append(sum(st.kv_read_fraction[2:]) / 28)
    assert all(0 < r < 1 for r in reads), f"the sparse layers' drafting read {reads} of the KV"


def test_static_engine_self_speculation_is_greedy_decoding(quick_pair, self_artifacts, prompts, greedy_refs):
    """The decode engine's self-speculation (per-layer selection; eager phases on CPU) through the runtime."""
    rt = SpecAttnRuntime.from_artifact(self_artifacts[0.5], target=quick_pair[1], engine="static")
    out = rt.generate(prompts[1], 32, k=4, eos_token_id=None)
    assert out.tokens == greedy_refs[1][:32] and out.stats.engine == "static"
    assert sum(out.stats.kv_read_fraction[2:]) / 28 < 1


def test_smaller_budgets_read_less(quick_pair, self_artifacts, prompts):
    read = {}
    for p in (0.9, 0.05):
        rt = SpecAttnRuntime.from_artifact(self_artifacts[p], target=quick_pair[1])
        st = rt.generate(prompts[0], 24, k=4, eos_token_id=None).stats
        read[p] = sum(st.kv_read_fraction[2:]) / 28
    assert read[0.05] < read[0.9] < 1.0, read


def tiny_llama(vocab=6, layers=2):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
                                   max_position_embeddings=512)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(hooks.register())
    return model


def test_seeded_sampling_follows_the_model(gen):
    """The first emitted token over many seeds follows the model's own next-token distribution, although the
    sparse drafts are drawn from another one (chi-square, small vocabulary)."""
    v, trials = 6, 800
    model = tiny_llama(v)
    rt = SpecAttnRuntime(self_artifact(None, 2, 0.3, dense=0), None, model)
    prompt = torch.randint(0, v, (120,), generator=gen).tolist()
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    counts, drafted, accepted = torch.zeros(v), 0, 0
    base = int(torch.randint(0, 2**40, (1,), generator=gen))
    for s in range(trials):
        out = rt.generate(prompt, 1, k=3, temperature=1.0, seed=base + s, eos_token_id=None)
        counts[out.tokens[0]] += 1
        drafted, accepted = drafted + out.stats.drafted, accepted + out.stats.accepted
    assert accepted < drafted, "every draft accepted: the sparse draft never differed, the test shows nothing"
    keep = p * trials >= 5
    expected = p[keep] * trials
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[int(keep.sum()) - 1]  # p = 0.001
    assert chi2 < critical, f"emitted {counts.tolist()} vs expected {(p * trials).tolist()}: chi2 {chi2:.1f}"


def test_verification_guided_chunks_equal_a_per_query_loop(gen):
    """The vectorised block selection against the definition, one query at a time with the sort reference."""
    hkv, t, q, k, cs = 2, 150, 12, 3, 8
    c = -(-t // cs)
    rows = torch.rand(hkv, q + k + 1, c, generator=gen) ** 4
    for r in range(q + k + 1):  # a query's row only has mass on keys it can see
        pos = t - (q + k + 1) + r
        rows[:, r, pos // cs + 1 :] = 0
    got = S.verification_guided_chunks(rows, t, q, k, 0.7, cs, method="sort")
    for i in range(q):
        pos = t - q + i
        e = (t - q) + (i // k) * k  # block start
        block = rows[:, e - k - 1 - (t - q - k - 1) : e - (t - q - k - 1)].sum(1)  # [Hkv, C]
        n_valid = -(-e // cs)
        sel = select_chunks(block[:, :n_valid], 0.7, method="sort")
        want = torch.zeros(hkv, c, dtype=torch.bool)
        want[:, :n_valid] = sel
        want[:, n_valid:] = True
        want[:, pos // cs + 1 :] = False
        assert torch.equal(got[:, i], want), f"query {i}"


@torch.no_grad()
def test_teacher_forced_first_draft_equals_the_runtime(quick_pair, prompts):
    """After a prefill of ``E`` tokens, the runtime's drafts of one block read exactly what the teacher-forced
    region pass gives positions ``E .. E + k - 1``: the same chunks, the same logits; and with every chunk read the
    region pass is the dense pass."""
    from specattn_runtime.cache import preallocated_cache
    from specattn_runtime.models import load_causal_lm

    t, k, p, layers = quick_pair[1], 4, 0.5, list(range(2, 30))
    ids = torch.tensor(prompts[1][:300])
    tf_model = load_causal_lm(t, attn_implementation=S.register())
    dense = S.dense_pass(tf_model, ids, k, k, layers, 16)
    full, _ = S.region_pass(tf_model, dense)
    assert torch.allclose(full, dense.logits, atol=2e-3, rtol=0), (full - dense.logits).abs().max()
    chunks = S.chunks_for(dense, layers, {j: p for j in layers}, method="sort")
    tf_logits, _ = S.region_pass(tf_model, dense, chunks)

    model = load_causal_lm(t, attn_implementation=hooks.register())
    e = ids.numel() - k  # the region's first position: the runtime has cached e positions
    cache = preallocated_cache(30, ids.numel() + 1)
    st = hooks.StepState("record", 16, record_layers=frozenset(layers), record_queries=k + 1)
    model(ids[None, :e], past_key_values=cache, use_cache=True, specattn_state=st)
    masks = select_per_kv_head(st.rows, layers, torch.full((len(layers),), p), e, 16, method="sort")
    for j in layers:
        assert torch.equal(masks[j][0], chunks[j][:, 0, : masks[j].shape[-1]]), f"layer {j}"
    for s in range(k):  # the text's tokens as the drafts of one fully accepted block
        draft = model(ids[None, e + s : e + s + 1], past_key_values=cache, use_cache=True,
                      specattn_state=hooks.StepState("verify", 16, chunk_masks=masks)).logits[0, -1]
        assert torch.allclose(draft, tf_logits[s], atol=2e-3, rtol=0), (s, (draft - tf_logits[s]).abs().max())
        assert (draft - dense.logits[s]).abs().max() > 1e-2, "the sparse draft is the dense model: nothing tested"


def test_mode_errors(quick_pair, self_artifacts, tmp_path):
    d, t = quick_pair
    with pytest.raises(ValueError, match="mode 'self'.*no draft"):
        SpecAttnRuntime.from_artifact(self_artifacts[0.9], target=t, draft=d)
    draft_art = save_artifact(dataclasses.replace(self_artifact(t, 30, 0.9), metadata={
        **self_artifact(t, 30, 0.9).metadata, "mode": "draft"}), tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="mode 'draft'.*pass the draft"):
        SpecAttnRuntime.from_artifact(draft_art, target=t)
    with pytest.raises(ValueError, match="target with 30 layers"):
        SpecAttnRuntime.from_artifact(self_artifacts[0.9], target=d)
    bad = self_artifact(t, 30, 0.9)
    lm = bad.layer_map.clone()
    lm[5] = 4
    with pytest.raises(ArtifactError, match="maps each sparse layer to itself"):
        validate_artifact(dataclasses.replace(bad, layer_map=lm))


@pytest.fixture(scope="module")
def calibrated_self(prefect_harness, tmp_path_factory):
    from pipelines.calibrate import calibrate

    out = tmp_path_factory.mktemp("calibrated-self")
    return calibrate(preset="quick", mode="self", output_dir=str(out), window_tokens=256, num_windows=2,
                     holdout_windows=1, queries_per_window=32, draft_k=4)


def test_calibration_writes_a_self_artifact_the_runtime_and_cli_use(calibrated_self, quick_pair, tmp_path):
    from specattn_runtime import load_artifact

    art = load_artifact(calibrated_self)
    assert art.metadata["mode"] == "self" and "quick-self" in calibrated_self
    hold = json.loads(art.metadata["holdout_quality"])
    assert 1.0 <= hold["mean_accepted_length"] <= 5.0 and 0 < hold["draft_kv_read_all_layers"] <= 1.0
    n_cand = art.curves["accepted_length"].numel()
    assert n_cand >= 2 and art.curves["acceptance_by_offset"].shape == (n_cand, 4)
    assert art.info("target_model")["weights_hash"] == model_fingerprint(quick_pair[1])["weights_hash"]
    (tmp_path / "prompt.txt").write_text("The history of the printing press begins")
    res = subprocess.run([sys.executable, "-m", "specattn_runtime.cli", "generate", "--artifact", calibrated_self,
                          "--target", quick_pair[1], "--prompt-file", str(tmp_path / "prompt.txt"),
                          "--max-new-tokens", "8", "--k", "3"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stderr[res.stderr.index("{"):])["new_tokens"] >= 1
    res = subprocess.run([sys.executable, "-m", "specattn_runtime.cli", "generate", "--artifact", calibrated_self,
                          "--draft", quick_pair[0], "--target", quick_pair[1], "--prompt-file",
                          str(tmp_path / "prompt.txt")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "mode 'self'" in res.stderr


@pytest.mark.parametrize("params,match", [
    (dict(mode="self", draft="x", target="y"), "not draft="),
    (dict(mode="self", draft_k=0), "draft_k"),
    (dict(mode="self", workers=2), "runs in this process"),
    (dict(mode="self", queries_per_window=2000), "region queries"),
    (dict(mode="selfish"), "mode must be"),
])
def test_bad_self_calibration_parameters_write_nothing(prefect_harness, params, match, tmp_path):
    from pipelines.calibrate import calibrate

    with pytest.raises(ValueError, match=match):
        calibrate(output_dir=str(tmp_path / "out"), **params)
    assert not (tmp_path / "out").exists()
