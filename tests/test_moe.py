"""The capturable experts (specattn_runtime/moe.py) against transformers' own: ``grouped_mm`` (its default),
``batched_mm`` and ``eager``, through the experts module's real dispatch, on GPT-OSS's experts (interleaved gate
and up, transposed weights, biases, clamped SwiGLU) with random weights and routing from its real router, ties and
zero weights included; and the runtime on a GPT-OSS model: switched, and its decode engine equal to the eager loop
and to transformers' greedy decoding (its default experts) token for token.
"""

import pytest
import torch
import transformers
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

from test_engine import noisy_copy
from test_engine_variants import artifact
from test_variants import eager_model, ids, with_attention
from specattn_runtime import SpecAttnRuntime, hooks, moe

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # max error relative to the output's largest magnitude
HIDDEN, E, K = 64, 6, 2


def config(**kw) -> transformers.GptOssConfig:
    return transformers.GptOssConfig(**{**dict(vocab_size=128, hidden_size=HIDDEN, intermediate_size=40,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16, num_local_experts=E, num_experts_per_tok=K), **kw})


def experts_and_router(dtype=torch.float32):
    """GPT-OSS's experts and router with random weights; experts 1 and 2 share router rows, so their logits tie."""
    cfg = config()
    torch.manual_seed(0)
    experts, router = GptOssExperts(cfg), GptOssTopKRouter(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.3)
        router.weight.normal_(0.0, 0.5)
        router.bias.normal_(0.0, 0.5)
        router.weight[2], router.bias[2] = router.weight[1], router.bias[1]
    return experts.to(dtype), router.to(dtype)


def routing(router, x: torch.Tensor, zero_every: int = 3):
    """The router's (index, weights) for ``x`` [T, H], with every ``zero_every``-th token's second weight zeroed."""
    _, weights, index = router(x)
    weights = weights.clone()
    weights[::zero_every, 1] = 0.0
    return index, weights


def run(experts, name: str, x, index, weights):
    """The experts module's own forward under experts implementation ``name`` (transformers' dispatch)."""
    experts.config._experts_implementation = name
    with torch.no_grad():
        return experts(x, index, weights)


def check_close(got, want, dtype, what):
    err = (got.float() - want.float()).abs()
    scale = want.float().abs().max().clamp_min(1e-6)
    assert err.max() <= TOL[dtype] * scale, f"{what}: max error {err.max():.3g}, mean {err.mean():.3g}, " \
                                            f"scale {scale:.3g}"


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Register the implementation the way the runtime does (on a throwaway model)."""
    assert moe.use_capturable_experts(transformers.GptOssForCausalLM(config()))


@pytest.mark.parametrize("n_tokens", [1, 7, 63, moe.DENSE_MAX_TOKENS])
def test_dense_experts_equal_transformers(n_tokens):
    experts, router = experts_and_router()
    x = torch.randn(n_tokens, HIDDEN, generator=torch.Generator().manual_seed(n_tokens))
    x[n_tokens // 2] = 0.0  # a token whose router logits are the bias alone
    index, weights = routing(router, x)
    with torch.no_grad():
        logits = router(x)[0]
    assert torch.equal(logits[:, 1], logits[:, 2])  # tied experts: topk picks both or neither by position
    assert (weights == 0).any()
    ours = run(experts, moe.NAME, x, index, weights)
    for ref in ("grouped_mm", "batched_mm", "eager"):
        check_close(ours, run(experts, ref, x, index, weights), torch.float32, f"T={n_tokens} vs {ref}")


def test_dense_experts_in_bfloat16_equal_batched_mm():
    experts, router = experts_and_router(torch.bfloat16)
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    index, weights = routing(router, x)
    ours = run(experts, moe.NAME, x, index, weights)
    assert ours.dtype == torch.bfloat16
    check_close(ours, run(experts, "batched_mm", x, index, weights), torch.bfloat16, "bf16 vs batched_mm")


def test_repeated_expert_ids_add_up():
    """Routing that names one expert twice for a token (no top-k router does, a custom one may): both count."""
    experts, router = experts_and_router()
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([[3, 3], [0, 5], [1, 1], [2, 4], [5, 0]])
    weights = torch.rand(5, 2, generator=torch.Generator().manual_seed(3))
    ours = run(experts, moe.NAME, x, index, weights)
    check_close(ours, run(experts, "batched_mm", x, index, weights), torch.float32, "repeated ids")


def test_more_tokens_than_the_threshold_take_grouped_mm(monkeypatch):
    calls = []
    real = transformers.integrations.moe.grouped_mm_experts_forward

    def counted(*args):
        calls.append(args[1].shape[0])
        return real(*args)

    monkeypatch.setattr(transformers.integrations.moe, "grouped_mm_experts_forward", counted)
    experts, router = experts_and_router()
    for n in (moe.DENSE_MAX_TOKENS, moe.DENSE_MAX_TOKENS + 45):
        x = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(n))
        index, weights = routing(router, x)
        ours = run(experts, moe.NAME, x, index, weights)
        check_close(ours, run(experts, "eager", x, index, weights), torch.float32, f"T={n} vs eager")
    assert calls == [moe.DENSE_MAX_TOKENS + 45]  # the dense path below, grouped_mm above


def test_switch_is_refused_where_it_cannot_apply():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2))
    assert not moe.use_capturable_experts(llama)  # no experts
    model = transformers.GptOssForCausalLM(config())
    for layer in model.model.layers:
        layer.mlp.experts._is_expert_parallel = True
    with pytest.raises(ValueError, match="expert-parallel"):
        moe.use_capturable_experts(model)


@torch.no_grad()
def test_runtime_switches_gpt_oss_and_the_engine_equals_the_eager_loop():
    """Four experts, two per token: the engine (what CUDA captures) against the eager loop, both on the dense
    experts, and against transformers' greedy decoding on its default experts (grouped_mm)."""
    ref = eager_model("gpt_oss-sinks", num_local_experts=4, num_experts_per_tok=2)
    target = with_attention(ref, hooks.register())
    draft = noisy_copy(target, 0.05, 1)
    art, prompt = artifact(0.6), ids(5)[0].tolist()
    eager = SpecAttnRuntime(art, draft, target, engine="eager", exact_dense_shortcut=False)
    static = SpecAttnRuntime(art, draft, target, engine="static", exact_dense_shortcut=False)
    assert target.config._experts_implementation == draft.config._experts_implementation == moe.NAME
    assert ref.config._experts_implementation == "grouped_mm"  # the reference keeps transformers' own
    kw = dict(k=3, eos_token_id=None)
    a, b = eager.generate(prompt, 20, **kw), static.generate(prompt, 20, **kw)
    assert (a.stats.engine, b.stats.engine) == ("eager", "static")
    assert a.tokens == b.tokens and a.stats.accepted_hist == b.stats.accepted_hist
    assert b.stats.accepted_hist[0] > 0  # some drafts rejected: the rollback is exercised
    sampled = dict(kw, temperature=0.8, top_p=0.9, seed=7)
    assert eager.generate(prompt, 20, **sampled).tokens == static.generate(prompt, 20, **sampled).tokens
    full = SpecAttnRuntime(artifact(1.0), draft, target, engine="static", exact_dense_shortcut=False)
    t = torch.tensor([prompt])
    want = ref.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=20, do_sample=False,
                        eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert full.generate(prompt, 20, **kw).tokens == want
