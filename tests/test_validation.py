"""Bad input to every public entry point: one clear error naming the argument, the value and what is allowed,
before anything expensive runs; nothing silently reinterpreted. Plain tests for known cases, Hypothesis for the
space around them (the artifact loader's file and metadata mutations, generate's arguments)."""

import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from specattn_runtime import ArtifactError, SpecAttnRuntime, load_artifact, save_artifact

from artifact_factory import make_artifact
from test_runtime_devices import tiny_llama

VOCAB = 512  # tiny_llama's


@pytest.fixture(scope="module")
def rt():
    art = make_artifact(n_t=4, n_d=2, dense=1)
    art = dataclasses.replace(art, layer_map=torch.tensor([-1, 0, 1, 1], dtype=torch.int32),
                              top_p=torch.tensor([1.0, 0.7, 0.7, 0.7]), metadata={**art.metadata, "dense_layers": "1"})
    return SpecAttnRuntime(art, tiny_llama(2, 1, "cpu"), tiny_llama(4, 2, "cpu"))


# -- generate: the rows of the issue, each asserting the message ------------------------------------------------

@pytest.mark.parametrize("prompt,error,message", [
    ([1, 10**9], ValueError, r"prompt_ids\[1\] is 1000000000, outside the vocabulary \[0, 512\)"),
    ([-3, 4], ValueError, r"prompt_ids\[0\] is -3, outside the vocabulary \[0, 512\)"),
    ([1.5, 2.2], TypeError, r"prompt_ids\[0\] is 1.5 \(float\): token ids are integers"),
    ([[1, 2], [3, 4]], ValueError, r"prompt_ids holds 2 prompts: generate takes one prompt"),
    (torch.tensor([[1, 2], [3, 4]]), ValueError, r"prompt_ids has shape \(2, 2\): generate takes one prompt"),
    (torch.tensor([1.0, 2.0]), TypeError, r"prompt_ids must hold integer token ids, got a tensor of torch.float32"),
    ("hello", TypeError, r"prompt_ids must be token ids, got a str \('hello'\); tokenize the text first"),
    ([], ValueError, r"prompt_ids is empty"),
    ([True, 3], TypeError, r"prompt_ids\[0\] is True \(bool\)"),
])
def test_bad_prompts(rt, prompt, error, message):
    with pytest.raises(error, match=message):
        rt.generate(prompt, 4)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(temperature=float("nan")), ValueError, r"temperature must be finite, got nan"),
    (dict(temperature=-1.0), ValueError, r"temperature must be >= 0 \(0 = greedy\), got -1.0"),
    (dict(temperature=0.7, top_p=0.0), ValueError, r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must lie in \(0, 1\]"),
    (dict(k=-1), ValueError, r"k must be >= 0, got -1"),
    (dict(k=2.5), TypeError, r"k must be an integer, got 2.5 \(float\)"),
    (dict(max_new_tokens=0), ValueError, r"max_new_tokens must be >= 1, got 0"),
    (dict(eos_token_id=VOCAB), ValueError, r"eos_token_id must be in \[0, 511\], got 512"),
    (dict(seed="x"), TypeError, r"seed must be an integer, got 'x' \(str\)"),
])
def test_bad_generation_arguments(rt, kwargs, error, message):
    kw = dict(max_new_tokens=4) | kwargs
    with pytest.raises(error, match=message):
        rt.generate([1, 2, 3], **kw)


def test_accepted_prompt_forms_are_the_same_prompt(rt):
    forms = [[5, 6, 7], (5, 6, 7), torch.tensor([5, 6, 7]), torch.tensor([[5, 6, 7]]), [[5, 6, 7]],
             [torch.tensor(5), torch.tensor(6), torch.tensor(7)]]
    outs = {tuple(rt.generate(p, 3, k=2, eos_token_id=None).tokens) for p in forms}
    assert len(outs) == 1


def test_device_and_backend_are_checked_before_models_load(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    art = save_artifact(make_artifact(), tmp_path / "a.safetensors")
    missing = tmp_path / "no-model"  # would fail later, with another message, if the check came after loading
    with pytest.raises(ValueError, match="backend 'triton' needs a CUDA device; this run is on cpu"):
        SpecAttnRuntime.from_artifact(art, draft=missing, target=missing, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton', 'flashinfer'; got 'nope'"):
        SpecAttnRuntime.from_artifact(art, draft=missing, target=missing, backend="nope")
    with pytest.raises(ValueError, match="engine must be one of"):
        SpecAttnRuntime.from_artifact(art, draft=missing, target=missing, engine="fast")
    with pytest.raises(ValueError, match="device must be a torch device"):
        SpecAttnRuntime.from_artifact(art, draft=missing, target=missing, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not available: torch sees no CUDA device"):
            SpecAttnRuntime.from_artifact(art, draft=missing, target=missing, device="cuda")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.text(max_size=3)),
       top_p=st.one_of(st.floats(-1, 2), st.just(float("nan")), st.none()),
       k=st.one_of(st.integers(-2, 3), st.floats(-1, 3)),
       max_new_tokens=st.one_of(st.integers(-1, 2), st.just(1.0)),
       prompt=st.one_of(st.lists(st.integers(-5, VOCAB + 5), max_size=4),
                        st.lists(st.floats(0, 10), min_size=1, max_size=2),
                        st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=2), min_size=1, max_size=2)))
def test_generate_takes_valid_arguments_and_refuses_the_rest_by_name(rt, temperature, top_p, k, max_new_tokens,
                                                                     prompt):
    try:
        out = rt.generate(prompt, max_new_tokens, k=k, temperature=temperature, top_p=top_p, seed=0,
                          eos_token_id=None)
    except (ValueError, TypeError) as e:
        named = ("prompt_ids", "temperature", "top_p", "k must", "max_new_tokens")
        assert any(n in str(e) for n in named), f"an error that names no argument: {e}"
        return
    # accepted: every argument really was valid, and the output obeys them
    assert isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0
    assert 0 < top_p <= 1 and isinstance(k, int) and k >= 0 and max_new_tokens >= 1
    assert len(out.tokens) == max_new_tokens and all(0 <= t < VOCAB for t in out.tokens)


# -- the artifact loader: a valid artifact or an ArtifactError, never another exception -----------------------

TENSORS = ("layer_map", "top_p", "kl", "curve.x")
DTYPES = (torch.float32, torch.float16, torch.int32, torch.int64, torch.bool, torch.uint8)


def _raw_save(tensors: dict, metadata: dict, path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _valid_parts():
    art = make_artifact(curve_numel=5)
    tensors = {"layer_map": art.layer_map, "top_p": art.top_p, "kl": art.kl, "curve.x": art.curves["big"]}
    return tensors, dict(art.metadata)


mutation = st.one_of(
    st.tuples(st.just("drop_tensor"), st.sampled_from(TENSORS)),
    st.tuples(st.just("dtype"), st.sampled_from(TENSORS), st.sampled_from(DTYPES)),
    st.tuples(st.just("shape"), st.sampled_from(TENSORS), st.lists(st.integers(0, 7), min_size=0, max_size=3)),
    st.tuples(st.just("value"), st.sampled_from(TENSORS), st.integers(0, 20),
              st.sampled_from([float("nan"), float("inf"), -1.0, 0.0, 2.0, 1e30, -7.0, 3.0])),
    st.tuples(st.just("drop_meta"), st.sampled_from(sorted(make_artifact().metadata))),
    st.tuples(st.just("meta"), st.sampled_from(sorted(make_artifact().metadata)),
              st.one_of(st.text(max_size=12), st.sampled_from(["-1", "0", "99", "{}", "[]", "null", "1.5", "draft",
                                                               "self", "specattn", "{\"a\": 1}"]))),
)


def _apply(tensors, metadata, m):
    kind, name = m[0], m[1]
    if kind == "drop_tensor":
        tensors.pop(name, None)
    elif kind == "dtype" and name in tensors:
        tensors[name] = tensors[name].to(m[2])
    elif kind == "shape" and name in tensors:
        t = tensors[name].flatten()
        n = math.prod(m[2]) if m[2] else 1
        tensors[name] = t.repeat(n // max(t.numel(), 1) + 1)[:n].reshape(m[2]) if t.numel() else torch.zeros(m[2])
    elif kind == "value" and name in tensors and tensors[name].numel():
        t = tensors[name].clone().flatten()
        i = m[2] % t.numel()
        if not t.is_floating_point():  # an integer (or bool) tensor takes the nearest value it can hold
            info = torch.iinfo(t.dtype) if t.dtype != torch.bool else None
            v = m[3] if math.isfinite(m[3]) else 0
            v = bool(v) if info is None else int(max(min(v, info.max), info.min))
        else:
            v = m[3]
        t[i] = v
        tensors[name] = t.reshape(tensors[name].shape)
    elif kind == "drop_meta":
        metadata.pop(name, None)
    elif kind == "meta":
        metadata[name] = m[2]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_artifacts_load_or_raise_artifact_error(tmp_path, mutations):
    tensors, metadata = _valid_parts()
    for m in mutations:
        _apply(tensors, metadata, m)
    path = tmp_path / "mutated.safetensors"
    _raw_save(tensors, metadata, path)
    try:
        art = load_artifact(path)
    except ArtifactError:
        return
    assert isinstance(art, type(make_artifact()))  # it loaded: then it is usable, and writes back identically
    again = load_artifact(save_artifact(art, tmp_path / "again.safetensors"))
    assert torch.equal(again.layer_map, art.layer_map) and again.metadata == art.metadata


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)),
                                                  max_size=4))
def test_corrupted_files_load_or_raise_artifact_error(tmp_path, cut, flips):
    """Bytes flipped anywhere (header length, header JSON, tensor data) and files cut short."""
    tensors, metadata = _valid_parts()
    path = tmp_path / "corrupt.safetensors"
    _raw_save(tensors, metadata, path)
    data = bytearray(path.read_bytes())
    for pos, x in flips:
        data[pos % len(data)] ^= x
    path.write_bytes(bytes(data[: len(data) - cut % len(data)] if cut % 3 == 0 else data))
    try:
        load_artifact(path)
    except ArtifactError:
        pass


def test_header_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.safetensors"
    header = json.dumps([1, 2]).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ArtifactError, match="header"):
        load_artifact(path)


# -- the command line: one line, exit code 2, before the models load --------------------------------------------

def _cli(args, env_drop=(), stdin=None):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "specattn_runtime.cli", *args], capture_output=True, text=True,
                         timeout=300, env=env, input=stdin)
    return res, time.perf_counter() - t0


@pytest.fixture(scope="module")
def cli_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    art = save_artifact(make_artifact(), root / "a.safetensors")
    (root / "prompt.txt").write_text("hello")
    missing = str(root / "no-model")  # the models are never reached by these commands
    return root, ["generate", "--artifact", str(art), "--draft", missing, "--target", missing]


@pytest.mark.parametrize("extra,message,env_drop", [
    (["--prompt-file", "/nope.txt"], "specattn: error: prompt file /nope.txt does not exist", ()),
    (["--prompt-file", "PROMPT", "--backend", "nope"], "specattn: error: argument --backend: invalid choice: 'nope'", ()),
    (["--prompt-file", "PROMPT", "--backend", "triton"],
     "specattn: error: backend 'triton' needs a CUDA device; this run is on cpu", ("TRITON_INTERPRET",)),
    (["--prompt-file", "BADUTF8"], "is not UTF-8 text: byte 3 is b'\\xff'", ()),
    (["--prompt-file", "PROMPT", "--temperature", "nan"], "specattn: error: temperature must be finite, got nan", ()),
    (["--prompt-file", "PROMPT", "--k", "-2"], "specattn: error: k must be >= 0, got -2", ()),
    (["--prompt-file", "PROMPT"], "specattn: error: draft path", ()),  # the models come last
])
def test_cli_errors_are_one_line(cli_base, extra, message, env_drop):
    if "backend 'triton'" in message and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    root, base = cli_base
    (root / "bad.txt").write_bytes(b"abc\xffdef")
    extra = [str(root / "prompt.txt") if a == "PROMPT" else str(root / "bad.txt") if a == "BADUTF8" else a
             for a in extra]
    res, seconds = _cli(base + extra, env_drop)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_cli_debug_shows_the_traceback(cli_base):
    root, base = cli_base
    res, _ = _cli(base + ["--prompt-file", "/nope.txt", "--debug"])
    assert res.returncode != 0 and "Traceback" in res.stderr and "does not exist" in res.stderr


@pytest.mark.slow
def test_flow_parameters_are_checked_before_any_server_starts():
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pipelines.calibrate", "--num-windows", "0"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "num_windows must be >= 1, got 0" in res.stderr, res.stderr
    assert "Starting temporary server" not in res.stderr + res.stdout
    res = subprocess.run([sys.executable, "-m", "pipelines.evaluate", "--prefill-fraction", "1.5"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "prefill_fraction must lie in (0, 1), got 1.5" in res.stderr, res.stderr
    assert time.perf_counter() - t0 < 60
