"""The decode engine on attention variants (CPU, graphs off): sliding windows (Mistral on every layer; Qwen2,
Gemma 2, Gemma 3 and GPT-OSS interleaved), soft-capping and ``query_pre_attn_scalar`` scaling (Gemma 2), sinks
(GPT-OSS), head_dim 256 and one KV head, against the eager loop token for token and, reading every chunk, against
transformers' own greedy decoding (its eager attention: the reference math of each variant).

The models are tests/test_variants.py's random-weight instances of the real architectures (3 layers, windows of
16-24 keys); prompts of 70 tokens and generations of 8-24, so every window layer decodes past its window. The
Triton cases run the kernels under the interpreter (``TRITON_INTERPRET=1``) and are skipped without it.
"""

import dataclasses
import os

import pytest
import torch
import transformers

from artifact_factory import make_artifact
from test_engine import noisy_copy
from test_variants import ARCHS, COMMON, T, eager_model, exact_artifact, ids, with_attention
from specattn_runtime import SpecAttnRuntime, hooks
from specattn_runtime.variants import layer_windows

VARIANT_ARCHS = [a for a in ARCHS if a != "llama-d256-1kv"]  # the plain one is tests/test_engine.py's business
interpreted = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton kernels on CPU tensors need the interpreter (TRITON_INTERPRET=1)")


def models(arch: str):
    """(draft, target) under the runtime's attention: the draft a noisy copy, so some drafts are rejected."""
    target = with_attention(eager_model(arch), hooks.register())
    return noisy_copy(target, 0.05, 1), target


def artifact(top_p: float, mode: str = "draft"):
    art = exact_artifact()  # layer 0 dense, layers 1 and 2 guided by draft layers 1 and 2
    art = dataclasses.replace(art, top_p=torch.tensor([1.0, top_p, top_p]))
    if mode == "self":
        art = dataclasses.replace(art, metadata={**art.metadata, "mode": "self"})
    return art


def transformers_greedy(arch: str, prompt: list[int], n: int) -> list[int]:
    t = torch.tensor([prompt])
    with torch.no_grad():
        return eager_model(arch).generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()


def same_run(arch, a, b):
    """Same tokens and per-step acceptance; the same read share on full-attention layers (the engine's share of a
    window layer counts the selected chunks against the whole prefix, the eager loop's against the window)."""
    assert (a.stats.engine, b.stats.engine) == ("eager", "static")
    assert a.tokens == b.tokens, f"{arch}: {a.tokens} vs {b.tokens}"
    assert a.stats.accepted_hist == b.stats.accepted_hist
    for j, w in enumerate(layer_windows(eager_model(arch).config)):
        if w is None:
            assert a.stats.kv_read_fraction[j] == pytest.approx(b.stats.kv_read_fraction[j], rel=0.02), j


@pytest.mark.parametrize("arch", VARIANT_ARCHS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@torch.no_grad()
def test_engine_equals_eager_loop(arch, temperature):
    """Sparse verification at p = 0.6 (selections intersected with each layer's window), greedy and seeded."""
    draft, target = models(arch)
    art = artifact(0.6)
    eager = SpecAttnRuntime(art, draft, target, engine="eager", exact_dense_shortcut=False)
    static = SpecAttnRuntime(art, draft, target, engine="static", exact_dense_shortcut=False)
    prompt = ids(5)[0].tolist()
    kw = dict(k=3, temperature=temperature, top_p=0.9, seed=7, eos_token_id=None)
    a, b = eager.generate(prompt, 20, **kw), static.generate(prompt, 20, **kw)
    same_run(arch, a, b)
    assert b.stats.accepted_hist[0] > 0  # rejections: rollback across the window is exercised


@pytest.mark.parametrize("arch", VARIANT_ARCHS)
@torch.no_grad()
def test_engine_with_every_chunk_equals_transformers_greedy(arch):
    """p = 1 through selection and the sparse path (no dense shortcut), k = 3, and k = 0 (the engine's dense
    decode attention): transformers' own greedy tokens, 20 past a 70-token prompt."""
    draft, target = models(arch)
    rt = SpecAttnRuntime(artifact(1.0), draft, target, engine="static", exact_dense_shortcut=False)
    prompt = ids(6)[0].tolist()
    ref = transformers_greedy(arch, prompt, 20)
    spec = rt.generate(prompt, 20, k=3, eos_token_id=None)
    assert spec.tokens == ref
    assert spec.stats.accepted_hist[-1] < spec.stats.steps  # some drafts were rejected
    assert rt.generate(prompt, 20, k=0, eos_token_id=None).tokens == ref


@pytest.mark.parametrize("arch", VARIANT_ARCHS)
@torch.no_grad()
def test_self_speculation_engine_is_lossless(arch):
    """Mode ``self``: sparse drafting (p = 0.3) inside each layer's window, dense recording verification: the
    greedy tokens are transformers' own; with every chunk drafted, seeded sampling equals the eager self loop."""
    _, target = models(arch)
    prompt = ids(7)[0].tolist()
    rt = SpecAttnRuntime(artifact(0.3, "self"), None, target, engine="static", exact_dense_shortcut=False)
    out = rt.generate(prompt, 24, k=3, eos_token_id=None)
    assert out.tokens == transformers_greedy(arch, prompt, 24)
    art = artifact(1.0, "self")
    kw = dict(k=3, temperature=0.8, seed=3, eos_token_id=None)
    a = SpecAttnRuntime(art, None, target, engine="eager", exact_dense_shortcut=False).generate(prompt, 24, **kw)
    b = SpecAttnRuntime(art, None, target, engine="static", exact_dense_shortcut=False).generate(prompt, 24, **kw)
    assert a.tokens == b.tokens and a.stats.accepted_hist == b.stats.accepted_hist


@pytest.mark.parametrize("arch", ["gemma3-1kv", "gpt_oss-sinks"])
@torch.no_grad()
def test_batched_engine_with_every_chunk_equals_transformers_greedy(arch):
    """The paged pool's attention takes the variants too: ragged prompts, one batch, each sequence's own greedy."""
    draft, target = models(arch)
    prompts = [ids(s)[0].tolist()[:n] for s, n in ((1, 70), (2, 50), (3, 65))]
    rt = SpecAttnRuntime(artifact(1.0), draft, target, engine="static", exact_dense_shortcut=False)
    outs = rt.generate_batch(prompts, 16, k=3, eos_token_id=None)
    assert [o.tokens for o in outs] == [transformers_greedy(arch, p, 16) for p in prompts]


# one model per feature: soft-capping with head_dim 256, window layers among full ones, one KV head, sinks (+ the
# runtime's dense experts); Mistral's window on every layer adds no path
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma2-softcap-d256", "qwen2-window-layers", "gemma3-1kv", "gpt_oss-sinks"])
@torch.no_grad()
def test_compiled_engine_equals_transformers_greedy(arch):
    """torch.compile over the engine's forwards (inductor on the CPU; whole graphs, no breaks, as on CUDA) with the
    variants as op arguments: transformers' greedy tokens with every chunk read, single sequence and batched."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # the process's counts so far (reset keeps them)
    draft, target = models(arch)
    rt = SpecAttnRuntime(artifact(1.0), draft, target, engine="static", compile=True, exact_dense_shortcut=False)
    assert rt.compile
    prompts = [ids(s)[0].tolist()[:n] for s, n in ((10, 70), (11, 55))]
    want = [transformers_greedy(arch, p, 12) for p in prompts]
    assert rt.generate(prompts[0], 12, k=3, eos_token_id=None).tokens == want[0]
    assert [o.tokens for o in rt.generate_batch(prompts, 12, k=3, eos_token_id=None)] == want
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2 and not torch._dynamo.utils.counters["graph_break"], "the forwards were not compiled whole"


@interpreted
@pytest.mark.parametrize("arch", ["gemma2-softcap-d256", "gpt_oss-sinks", "mistral-window-1kv", "gemma3-1kv"])
@torch.no_grad()
def test_engine_through_triton_kernels(arch):
    """The kernels' window, soft-cap and sink paths inside the engine (dense decode, recording, selection, sparse
    verification): transformers' greedy tokens with every chunk read, and the eager loop's at p = 0.6."""
    draft, target = models(arch)
    prompt = ids(8)[0].tolist()
    kw = dict(backend="triton", selection="triton", exact_dense_shortcut=False)
    rt = SpecAttnRuntime(artifact(1.0), draft, target, engine="static", **kw)
    assert rt.generate(prompt, 10, k=3, eos_token_id=None).tokens == transformers_greedy(arch, prompt, 10)
    art = artifact(0.6)
    a = SpecAttnRuntime(art, draft, target, engine="eager", **kw).generate(prompt, 8, k=3, eos_token_id=None)
    b = SpecAttnRuntime(art, draft, target, engine="static", **kw).generate(prompt, 8, k=3, eos_token_id=None)
    same_run(arch, a, b)


@interpreted
@torch.no_grad()
def test_self_speculation_through_triton_kernels():
    _, target = models("gpt_oss-sinks")
    prompt = ids(9)[0].tolist()
    rt = SpecAttnRuntime(artifact(0.3, "self"), None, target, engine="static", backend="triton", selection="triton",
                         exact_dense_shortcut=False)
    assert rt.generate(prompt, 10, k=3, eos_token_id=None).tokens == transformers_greedy("gpt_oss-sinks", prompt, 10)


def test_runtime_takes_variant_models_on_every_engine():
    """Nothing falls back any more: "auto" keeps the engine it would pick for a plain model (eager on CPU, static
    on CUDA), and an explicit static engine is accepted."""
    draft, target = models("gemma2-softcap-d256")
    art = make_artifact(n_t=3, n_d=3, dense=1)
    assert SpecAttnRuntime(art, draft, target).engine == ("static" if torch.cuda.is_available() else "eager")
    rt = SpecAttnRuntime(art, draft, target, engine="static")
    assert (rt.engine, rt.backend) == ("static", "torch")


@pytest.mark.parametrize("config, feature", [
    (lambda: transformers.Llama4TextConfig(**{**COMMON, "num_hidden_layers": 4, "num_local_experts": 2,
                                              "intermediate_size_mlp": 64, "head_dim": 16}),
     "layer types \\['chunked_attention'\\]"),
    (lambda: transformers.Qwen3NextConfig(**{**COMMON, "num_hidden_layers": 4, "num_experts": 2, "head_dim": 16,
                                             "linear_num_value_heads": 2, "linear_num_key_heads": 2}),
     "layer types \\['linear_attention'\\]"),
])
def test_engine_still_refuses_other_layer_types_by_name(config, feature):
    cfg = config()
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    art = make_artifact(n_t=4, n_d=4, dense=1)
    for engine in ("static", "eager", "auto"):
        with pytest.raises(ValueError, match=f"model type '{cfg.model_type}' has {feature}"):
            SpecAttnRuntime(art, model, model, engine=engine)


def test_prompt_is_longer_than_every_window():
    cfg = eager_model("gemma3-1kv").config
    assert all(w is None or w < T for w in layer_windows(cfg)) and any(layer_windows(cfg))
