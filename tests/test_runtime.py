"""SpecAttnRuntime on the real shipped pair (SmolLM2-135M target, its 10-layer early exit as draft), on CPU."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from specattn_runtime import SpecAttnRuntime, save_artifact
from specattn_runtime.fingerprint import model_fingerprint, tokenizer_hash

from artifact_factory import make_artifact

pytestmark = pytest.mark.slow
N_NEW = 64


def pair_artifact(draft, target, top_p: float):
    """An artifact for the real pair: draft layers 2..9 guide target layers 2..9, layer 9 the rest."""
    base = make_artifact(n_t=30, n_d=10, dense=2)
    md = dict(base.metadata)
    md["draft_model"] = json.dumps({**model_fingerprint(draft), "n_layers": 10})
    md["target_model"] = json.dumps({**model_fingerprint(target), "n_layers": 30})
    md["tokenizer_hash"] = tokenizer_hash(target)
    layer_map = torch.tensor([-1, -1] + [min(j, 9) for j in range(2, 30)], dtype=torch.int32)
    top_p_t = torch.tensor([1.0, 1.0] + [top_p] * 28)
    return dataclasses.replace(base, layer_map=layer_map, top_p=top_p_t, metadata=md)


@pytest.fixture(scope="module")
def prompt_ids(quick_pair):
    from pipelines import assets
    from pipelines.corpus import wiki_articles
    from specattn_runtime.models import load_tokenizer

    text = wiki_articles(assets.fetch(assets.ENWIKI_BZ2))[11][1]
    return load_tokenizer(quick_pair[1])(text).input_ids[:300]


@pytest.fixture(scope="module")
def greedy_reference(quick_pair, prompt_ids):
    from specattn_runtime.models import load_causal_lm

    target = load_causal_lm(quick_pair[1])
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def artifacts(quick_pair, tmp_path_factory):
    d, t = quick_pair
    root = tmp_path_factory.mktemp("rt")
    return {p: save_artifact(pair_artifact(d, t, p), root / f"p{p}.safetensors") for p in (1.0, 0.9)}


def test_all_dense_p_reproduces_greedy_through_the_sparse_path(quick_pair, artifacts, prompt_ids, greedy_reference):
    d, t = quick_pair
    rt = SpecAttnRuntime.from_artifact(artifacts[1.0], draft=d, target=t, exact_dense_shortcut=False)
    assert len(rt.sparse_layers) == 28, "p = 1 layers must go through selection + sparse backend here"
    out = rt.generate(prompt_ids, N_NEW, k=4, eos_token_id=None)
    assert out.tokens == greedy_reference
    assert out.stats.kv_read_fraction == pytest.approx([1.0] * 30)
    assert out.stats.new_tokens == N_NEW and 1.0 <= out.stats.mean_accepted_length <= 5.0


def test_sparse_verification_reads_less_and_reports_it(quick_pair, artifacts, prompt_ids, greedy_reference):
    d, t = quick_pair
    rt = SpecAttnRuntime.from_artifact(artifacts[0.9], draft=d, target=t)
    out = rt.generate(prompt_ids, 32, k=4, eos_token_id=None)
    kv = out.stats.kv_read_fraction
    assert kv[:2] == [1.0, 1.0] and all(0.0 < f < 1.0 for f in kv[2:]), kv
    assert len(out.tokens) == 32
    differ = sum(a != b for a, b in zip(out.tokens, greedy_reference))
    print(f"sparse p=0.9: {differ}/32 tokens differ from dense greedy; kv read {sum(kv[2:]) / 28:.3f}")
    s = out.stats.summary()
    assert s["time_draft"] > 0 and s["time_verify"] > 0 and s["tokens_per_second"] > 0


def test_sampling_is_seeded_and_stops_at_eos(quick_pair, artifacts, prompt_ids, greedy_reference):
    d, t = quick_pair
    rt = SpecAttnRuntime.from_artifact(artifacts[0.9], draft=d, target=t)
    a = rt.generate(prompt_ids, 12, k=3, temperature=0.8, top_p=0.95, seed=7, eos_token_id=None)
    b = rt.generate(prompt_ids, 12, k=3, temperature=0.8, top_p=0.95, seed=7, eos_token_id=None)
    assert a.tokens == b.tokens and len(a.tokens) == 12
    rt_dense = SpecAttnRuntime.from_artifact(artifacts[1.0], draft=d, target=t)
    eos = greedy_reference[2]
    out = rt_dense.generate(prompt_ids, 20, k=4, eos_token_id=eos)
    assert out.tokens == greedy_reference[: greedy_reference.index(eos) + 1]


def test_bad_inputs_are_clear_errors(quick_pair, artifacts, tmp_path):
    d, t = quick_pair
    with pytest.raises(ValueError, match="target with 30 layers.*has 10"):  # draft and target swapped
        SpecAttnRuntime.from_artifact(artifacts[0.9], draft=t, target=d)
    bad = pair_artifact(d, t, 0.9)
    md = dict(bad.metadata)
    md["target_model"] = json.dumps({**json.loads(md["target_model"]), "weights_hash": "0" * 64})
    path = save_artifact(dataclasses.replace(bad, metadata=md), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="target_model.weights_hash"):
        SpecAttnRuntime.from_artifact(path, draft=d, target=t)
    rt = SpecAttnRuntime.from_artifact(path, draft=d, target=t, allow_mismatch=True)
    with pytest.raises(ValueError, match="exceeds the models' context"):
        rt.generate([1] * 8190, 16)
    with pytest.raises(ValueError, match="empty"):
        rt.generate([], 4)
    with pytest.raises(FileNotFoundError):
        SpecAttnRuntime.from_artifact(tmp_path / "none.safetensors", draft=d, target=t)


def test_cli_streams_text(quick_pair, artifacts, tmp_path):
    d, t = quick_pair
    (tmp_path / "prompt.txt").write_text("The capital of France is")
    res = subprocess.run([sys.executable, "-m", "specattn_runtime.cli", "generate", "--artifact",
                          str(artifacts[0.9]), "--draft", d, "--target", t, "--prompt-file",
                          str(tmp_path / "prompt.txt"), "--max-new-tokens", "8", "--k", "3"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip(), "no text streamed"
    assert json.loads(res.stderr[res.stderr.index("{"):])["new_tokens"] >= 1


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_static_engine_equals_eager_loop_on_the_real_pair(quick_pair, artifacts, prompt_ids, temperature):
    """The decode engine's bookkeeping (device-side lengths, rollback, acceptance and sampling on the device) on
    the shipped models, run without graphs on CPU, against the eager loop: the same tokens."""
    d, t = quick_pair
    eager = SpecAttnRuntime.from_artifact(artifacts[0.9], draft=d, target=t)
    static = SpecAttnRuntime(eager.artifact, eager.draft, eager.target, eager.tokenizer, engine="static")
    kw = dict(k=4, temperature=temperature, top_p=0.95, seed=3, eos_token_id=None)
    a, b = eager.generate(prompt_ids, 32, **kw), static.generate(prompt_ids, 32, **kw)
    assert (a.stats.engine, b.stats.engine) == ("eager", "static")
    assert a.tokens == b.tokens and a.stats.accepted_hist == b.stats.accepted_hist
    assert b.stats.kv_read_fraction == pytest.approx(a.stats.kv_read_fraction, rel=0.02)


def test_static_engine_with_full_reads_equals_greedy(quick_pair, artifacts, prompt_ids, greedy_reference):
    d, t = quick_pair
    rt = SpecAttnRuntime.from_artifact(artifacts[1.0], draft=d, target=t, exact_dense_shortcut=False,
                                       engine="static")
    assert rt.generate(prompt_ids, N_NEW, k=4, eos_token_id=None).tokens == greedy_reference
    assert rt.generate(prompt_ids, N_NEW, k=0, eos_token_id=None).tokens == greedy_reference
