"""The runtime on every device present (CPU always, CUDA when there): tiny random Llama pair, GQA, built in-test.

On CUDA this exercises the automatic Triton selection path inside generation; on CPU the torch threshold search.
"""

import json
import os

import pytest
import torch

from specattn_runtime import SpecAttnRuntime
from specattn_runtime.hooks import register

from artifact_factory import make_artifact

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_llama(n_layers: int, seed: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # A large init gives peaked logits: greedy argmax then has no near-ties that float rounding could flip.
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      initializer_range=0.3, attn_implementation=register())
    return LlamaForCausalLM(cfg).to(device).eval()


def runtime(device: str, top_p: float, exact_dense_shortcut=True, **kw) -> SpecAttnRuntime:
    import dataclasses

    art = make_artifact(n_t=4, n_d=2, dense=1)
    art = dataclasses.replace(art, layer_map=torch.tensor([-1, 0, 1, 1], dtype=torch.int32),
                              top_p=torch.tensor([1.0, top_p, top_p, top_p]),
                              metadata={**art.metadata, "dense_layers": "1"})
    return SpecAttnRuntime(art, tiny_llama(2, 1, device), tiny_llama(4, 2, device),
                           exact_dense_shortcut=exact_dense_shortcut, **kw)


# On CPU the kernels path runs in Triton's interpreter: the same code CUDA runs compiled.
@pytest.mark.parametrize("device,kernels", [(d, k) for d in DEVICES for k in (False, True)])
def test_p1_through_sparse_path_equals_greedy(device, kernels):
    if kernels and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need the interpreter (TRITON_INTERPRET=1)")
    kw = {"backend": "triton", "selection": "triton"} if kernels else {}
    rt = runtime(device, 1.0, exact_dense_shortcut=False, **kw)
    if not kernels:
        assert rt.selection == ("triton" if device == "cuda" else "threshold")
        assert rt.backend == ("triton" if device == "cuda" else "torch")
    n_prompt, n_new = (200, 10) if kernels and device == "cpu" else (700, 40)  # the interpreter is slow
    prompt = torch.randint(0, 512, (n_prompt,), generator=torch.Generator().manual_seed(3)).tolist()
    out = rt.generate(prompt, n_new, k=5, eos_token_id=None)
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)  # explicit mask: token 0 in a random prompt is not padding
        ref = rt.target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, n_prompt:].tolist()
    assert out.tokens == ref
    assert out.stats.kv_read_fraction == pytest.approx([1.0] * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_generation_reads_a_fraction(device):
    rt = runtime(device, 0.5)
    prompt = torch.randint(0, 512, (1500,), generator=torch.Generator().manual_seed(4)).tolist()
    out = rt.generate(prompt, 24, k=4, eos_token_id=None, temperature=0.7, seed=1)
    kv = out.stats.kv_read_fraction
    assert len(out.tokens) == 24 and kv[0] == 1.0 and all(0 < f < 1 for f in kv[1:]), kv
    print(device, json.dumps(out.stats.summary()))


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_models_loaded_with_their_default_attention_are_switched(engine):
    """Models the caller loaded without ``attn_implementation="specattn"`` (transformers' default, SDPA) get our
    attention function in place: the sparse path then runs (reads a fraction) and gives the tokens of models
    loaded with it, rather than silently decoding densely or failing inside a step."""
    def plain(model):
        model.set_attn_implementation("sdpa")
        return model

    prompt = torch.randint(0, 512, (700,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = runtime("cpu", 0.5, engine=engine).generate(prompt, 12, k=3, eos_token_id=None)
    rt = runtime("cpu", 0.5, engine=engine)
    rt = SpecAttnRuntime(rt.artifact, plain(rt.draft), plain(rt.target), engine=engine)
    assert rt.draft.config._attn_implementation == rt.target.config._attn_implementation == "specattn"
    out = rt.generate(prompt, 12, k=3, eos_token_id=None)
    assert out.tokens == ref.tokens
    assert all(0 < f < 1 for f in out.stats.kv_read_fraction[1:]), out.stats.kv_read_fraction
