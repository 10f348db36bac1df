"""Attention variants: with nothing skipped, the recording (calibration) and evaluation functions give
transformers' own logits on every architecture they accept, and what a path does not implement is refused by name.

Models are small random-weight instances of real transformers architectures, compared with the same weights under
transformers' ``eager`` attention (its reference math for every variant): sliding windows (Mistral: every layer;
Qwen2, Gemma2, Gemma3, GPT-OSS: interleaved), logit soft-capping and ``query_pre_attn_scalar`` scaling (Gemma2),
head_dim 256 (Gemma2), one KV head (Mistral, Gemma3), attention sinks (GPT-OSS). Texts are longer than the windows.
"""

import copy
import dataclasses
import math

import pytest
import torch
import transformers

from artifact_factory import make_artifact
from test_engine import noisy_copy
from pipelines import sparse_eval
from specattn_runtime import SpecAttnRuntime, capture, hooks
from specattn_runtime.pooling import pool_to_chunks
from specattn_runtime.sparse import sparse_attention
from specattn_runtime.variants import Variant, check_supported, layer_windows

T, CHUNK = 70, 16
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              initializer_range=0.2)  # peaked logits and attention: varied greedy text, few near-ties
ARCHS = {  # name -> (model class, config class, config arguments)
    "mistral-window-1kv": ("MistralForCausalLM", "MistralConfig", dict(num_key_value_heads=1, sliding_window=24)),
    "gemma2-softcap-d256": ("Gemma2ForCausalLM", "Gemma2Config",
                            dict(num_key_value_heads=2, head_dim=256, sliding_window=16, attn_logit_softcapping=5.0,
                                 final_logit_softcapping=30.0, query_pre_attn_scalar=20, tie_word_embeddings=False)),
    "qwen2-window-layers": ("Qwen2ForCausalLM", "Qwen2Config",
                            dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=20,
                                 max_window_layers=1)),
    "gpt_oss-sinks": ("GptOssForCausalLM", "GptOssConfig",
                      dict(COMMON, intermediate_size=32, num_key_value_heads=2, head_dim=16, sliding_window=16,
                           num_local_experts=2, num_experts_per_tok=1)),
    "gemma3-1kv": ("Gemma3ForCausalLM", "Gemma3TextConfig",
                   dict(num_key_value_heads=1, head_dim=32, sliding_window=16, query_pre_attn_scalar=24,
                        tie_word_embeddings=False)),  # tied random models repeat their last token
    "llama-d256-1kv": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=1, head_dim=256)),
}
_CACHE: dict = {}


def eager_model(arch: str, **overrides):
    """The architecture with random weights under transformers' eager attention (sinks and norms randomised);
    ``overrides``: config values to change (e.g. a longer window for the GPU tests)."""
    key = (arch, tuple(sorted(overrides.items())))
    if key not in _CACHE:
        model_cls, cfg_cls, kw = ARCHS[arch]
        cfg = getattr(transformers, cfg_cls)(**{**COMMON, **kw, **overrides})
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(cfg).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.self_attn, "sinks"):
                    layer.self_attn.sinks.normal_()
            for name, p in model.named_parameters():  # norm weights start equal (Gemma's at 0): vary them, or
                if name.endswith("norm.weight"):  # random Gemmas repeat one token
                    p.normal_(1.0 if p.mean() > 0.5 else 0.0, 0.5)
        _CACHE[key] = model
    return _CACHE[key]


def with_attention(model, name: str):
    m = copy.deepcopy(model)
    m.set_attn_implementation(name)
    return m


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(ARCHS))
@torch.no_grad()
def test_recording_equals_transformers(arch):
    ref_model = eager_model(arch)
    x = ids()
    ref = ref_model(x, output_attentions=True)
    rec = capture.AttentionRecorder(torch.arange(T), CHUNK)
    out = with_attention(ref_model, capture.register())(x, specattn_recorder=rec)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for layer, probs in enumerate(ref.attentions):  # [1, H, T, T]: the pooled, head-averaged rows are recorded
        torch.testing.assert_close(rec.rows[layer], pool_to_chunks(probs.float().mean(1), CHUNK), rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
@torch.no_grad()
def test_evaluation_dense_pass_equals_transformers_and_reads_only_the_window(arch):
    ref_model = eager_model(arch)
    x = ids(1)
    ref = ref_model(x).logits
    target = with_attention(ref_model, sparse_eval.register())
    dense = sparse_eval.PassMasks(CHUNK)
    torch.testing.assert_close(target(x, specattn_eval=dense, use_cache=False).logits, ref, rtol=1e-4, atol=1e-4)
    # every chunk selected on every layer: still nothing outside a layer's window is read, and the logits stay
    all_chunks = sparse_eval.PassMasks(CHUNK, chunks={j: torch.ones(T, math.ceil(T / CHUNK), dtype=torch.bool)
                                                      for j in range(3)})
    torch.testing.assert_close(target(x, specattn_eval=all_chunks, use_cache=False).logits, ref, rtol=1e-4,
                               atol=1e-4)
    t = torch.arange(T, dtype=torch.float32)
    for j, window in enumerate(layer_windows(ref_model.config)):
        expect = t + 1 if window is None else torch.clamp(t + 1, max=window)
        assert torch.equal(dense.read[j], expect) and torch.equal(all_chunks.read[j], expect), f"layer {j}"


@pytest.mark.parametrize("arch", ["gemma2-softcap-d256", "gpt_oss-sinks", "mistral-window-1kv"])
@torch.no_grad()
def test_evaluate_window_with_every_chunk_equals_dense(arch):
    """The evaluation protocol end to end: p = 1 gives the dense NLL (transformers' own), p < 1 reads less."""
    ref_model = eager_model(arch)
    x = ids(2)[0]
    target = with_attention(ref_model, sparse_eval.register())
    draft = with_attention(ref_model, capture.register())
    layer_map, prefill = [-1, 0, 1], 20
    methods = [sparse_eval.Method("dense", "dense"), sparse_eval.Method("p1", "specattn", (1.0, 1.0, 1.0)),
               sparse_eval.Method("p05", "specattn", (1.0, 0.5, 0.5)),
               sparse_eval.Method("quest", "quest", match="p05"),
               sparse_eval.Method("oracle", "oracle", (1.0, 0.5, 0.5))]
    res = sparse_eval.evaluate_window(target, draft, x, layer_map, methods, CHUNK, prefill)
    lp = torch.log_softmax(ref_model(x[None]).logits[0, prefill:-1].double(), -1)
    ref_nll = -lp.gather(-1, x[prefill + 1 :, None]).squeeze(-1)
    torch.testing.assert_close(res["dense"].nll, ref_nll, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res["p1"].nll, ref_nll, rtol=1e-4, atol=1e-4)
    windows = layer_windows(ref_model.config)
    for name in ("p1", "p05", "quest", "oracle"):
        r = res[name]
        assert torch.all(r.read <= r.avail + 1e-9) and torch.all(torch.isfinite(r.nll)), name
        for j, window in enumerate(windows):  # a sliding layer's visible keys are its window, not the prefix
            visible = sum(min(q + 1, window or T) for q in range(prefill, T - 1))
            assert r.avail[j].item() == visible, (name, j)
    assert res["p1"].read.sum() == res["dense"].read.sum() > res["p05"].read.sum()


@pytest.mark.parametrize("arch, overrides, feature", [
    ("mistral-window-1kv", {}, "sliding-window attention"),
    ("gemma2-softcap-d256", {"layer_types": ["full_attention"] * 3}, "attention logit soft-capping"),
    ("gpt_oss-sinks", {"layer_types": ["full_attention"] * 3}, "attention sinks"),
    ("qwen2-window-layers", {}, "sliding-window attention"),
])
def test_what_flashinfer_does_not_implement_is_refused_by_name(arch, overrides, feature):
    model_cls, cfg_cls, kw = ARCHS[arch]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **kw, **overrides})
    with pytest.raises(ValueError, match=f"model type '{cfg.model_type}' uses {feature}.*FlashInfer"):
        check_supported(cfg, variants=False)
    # every other path takes it: calibration, evaluation, both engines with the torch or Triton backend
    # (tests/test_engine_variants.py)
    check_supported(cfg, variants=True, triton=True)


def exact_artifact():
    """Every target layer through selection and the sparse backend (p = 1), layer 0 dense."""
    art = make_artifact(n_t=3, n_d=3, dense=1)
    return dataclasses.replace(art, layer_map=torch.tensor([-1, 1, 2], dtype=torch.int32),
                               top_p=torch.tensor([1.0, 1.0, 1.0]))


@pytest.mark.parametrize("arch", list(ARCHS))
@torch.no_grad()
def test_runtime_with_every_chunk_equals_transformers_greedy(arch):
    """The eager loop with the torch backend: draft recording, selection and sparse verification (p = 1, no
    dense shortcut) give transformers' own greedy tokens, past the windows, with a draft that is sometimes wrong."""
    ref_model = eager_model(arch)
    prompt = ids(3)[0].tolist()
    t = torch.tensor([prompt])
    ref = ref_model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, T:].tolist()
    target = with_attention(ref_model, hooks.register())
    draft = noisy_copy(with_attention(ref_model, hooks.register()), 0.05, 1)  # rejections at varied positions
    rt = SpecAttnRuntime(exact_artifact(), draft, target, exact_dense_shortcut=False)
    assert (rt.engine, rt.backend) == ("eager", "torch")
    out = rt.generate(prompt, 12, k=3, eos_token_id=None)
    assert out.tokens == ref
    assert out.stats.accepted_hist[-1] < out.stats.steps  # some drafts were rejected
    assert out.stats.kv_read_fraction == pytest.approx([1.0] * 3)  # all of each layer's window, no more


def test_runtime_reads_only_the_window_at_any_p():
    ref_model = eager_model("mistral-window-1kv")  # window 24 on every layer, prompt of 70
    art = dataclasses.replace(exact_artifact(), top_p=torch.tensor([1.0, 0.3, 0.3]))
    rt = SpecAttnRuntime(art, with_attention(ref_model, hooks.register()), with_attention(ref_model, hooks.register()))
    out = rt.generate(ids(4)[0].tolist(), 10, k=3, eos_token_id=None)
    assert out.stats.kv_read_fraction[0] == 1.0 and all(0 < f <= 1.0 for f in out.stats.kv_read_fraction[1:])
    # the accounting: the sink chunk (outside the window) is selected but not read; 46 .. 69 is the window
    from specattn_runtime.eager import _read_fractions

    sel = torch.zeros(1, 5, dtype=torch.bool)
    sel[0, [0, 3, 4]] = True  # keys 0-15 (outside), 48-63 (inside), 64-69 (inside)
    got = _read_fractions(rt, {1: sel, 2: (torch.tensor([[0, 3, 4, 0, 0]], dtype=torch.int32),
                                           torch.tensor([3], dtype=torch.int32))}, torch.tensor([3, 3]), 70)
    assert got.tolist() == pytest.approx([22 / 24, 22 / 24])


def test_sparse_reference_never_reads_outside_the_window(gen):
    """Selecting chunks outside a layer's window changes nothing: those keys are never read."""
    b, h, hkv, tq, tk, d, window = 1, 4, 2, 3, 90, 16, 20
    q, k, v = (torch.randn(b, n, t, d, generator=gen) for n, t in ((h, tq), (hkv, tk), (hkv, tk)))
    n_chunks = math.ceil(tk / CHUNK)
    near = torch.zeros(b, n_chunks, dtype=torch.bool)
    near[:, (tk - tq - window) // CHUNK :] = True  # every chunk the window touches
    everything = torch.ones(b, n_chunks, dtype=torch.bool)
    for variant in (Variant(window=window), Variant(window=window, softcap=3.0, sinks=torch.randn(h, generator=gen))):
        a = sparse_attention(q, k, v, everything, chunk_size=CHUNK, variant=variant)
        torch.testing.assert_close(a, sparse_attention(q, k, v, near, chunk_size=CHUNK, variant=variant))
        ref = capture.softmax_attention(q, k, v, None, d ** -0.5, variant)[0].transpose(1, 2)
        torch.testing.assert_close(a, ref)
        assert torch.isfinite(a).all()
    with pytest.raises(ValueError, match="need backend 'torch' or 'triton'"):  # the kernels: test_kernel_variants
        sparse_attention(q, k, v, everything, chunk_size=CHUNK, variant=Variant(window=window), backend="flashinfer")


@pytest.mark.parametrize("config, feature", [
    (lambda: transformers.Qwen3NextConfig(num_hidden_layers=4), "layer types \\['linear_attention'\\]"),
    (lambda: transformers.Llama4TextConfig(num_hidden_layers=4), "layer types \\['chunked_attention'\\]"),
])
def test_layer_types_nobody_implements_are_refused_everywhere(config, feature):
    cfg = config()
    for variants in (True, False):
        with pytest.raises(ValueError, match=f"model type '{cfg.model_type}' has {feature}"):
            check_supported(cfg, variants=variants)


def test_plain_models_pass_every_check():
    for arch in ("llama-d256-1kv",):
        check_supported(eager_model(arch).config, variants=False, triton=True)
    qwen_full = transformers.Qwen2Config(**COMMON, use_sliding_window=False, sliding_window=4096)
    check_supported(qwen_full, variants=False)  # a window in the config that no layer uses


def test_calibration_refuses_an_unsupported_architecture_before_loading_it(tmp_path):
    from pipelines.calibrate import check_params

    transformers.Qwen3NextConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"never loaded")
    with pytest.raises(ValueError, match="model type 'qwen3_next' has layer types \\['linear_attention'\\]"):
        check_params(None, str(tmp_path), str(tmp_path))


def test_heterogeneous_per_layer_configs_are_refused_by_name():
    cfg = transformers.LlamaConfig(**{**COMMON, "num_key_value_heads": 2})
    if not hasattr(cfg, "is_heterogeneous"):
        pytest.skip("this transformers has no per-layer configs")
    cfg.per_layer_config = {1: {"num_key_value_heads": 1}}
    for variants in (True, False):
        with pytest.raises(ValueError, match="model type 'llama' has per-layer values of \\['num_key_value_heads'\\]"):
            check_supported(cfg, variants=variants)
