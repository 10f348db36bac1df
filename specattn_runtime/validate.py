"""Argument checks for the runtime's public entry points (``from_artifact``, ``generate``, the CLI).

Each check raises one ``ValueError`` or ``TypeError`` that names the argument, the value it got and what is
allowed, before anything expensive runs: the device and backend before any model is loaded, the prompt and the
sampling settings before any forward. Nothing is silently reinterpreted (a float id is not truncated, two prompts
are not flattened into one, a NaN temperature is not taken for greedy).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
import weakref

import torch

BACKENDS = ("auto", "torch", "triton", "flashinfer")
SELECTIONS = ("auto", "sort", "threshold", "triton")
ENGINES = ("auto", "static", "eager")
_WARNED_PREFIX: "weakref.WeakSet" = weakref.WeakSet()  # runtimes already warned about a missing BOS


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def device(value) -> torch.device:
    """A usable torch device: the string parses and, for CUDA, a GPU is present."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1'; got {value!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {value!r} is not available: torch sees no CUDA device here "
                             f"(torch {torch.__version__}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {value!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ValueError(f"device type {dev.type!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def kernels(backend: str, selection: str, engine: str, dev: torch.device) -> None:
    """The backend, selection method and engine exist and can run on ``dev``."""
    _choice("backend", backend, BACKENDS)
    _choice("selection", selection, SELECTIONS)
    _choice("engine", engine, ENGINES)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for name, value in (("backend", backend), ("selection", selection)):
        if value == "triton" and dev.type != "cuda" and not interpreted:
            raise ValueError(f"{name} 'triton' needs a CUDA device; this run is on {dev.type} (use 'auto', or set "
                             "TRITON_INTERPRET=1 for Triton's slow interpreter)")
    if backend == "flashinfer":
        from .sparse.flashinfer_backend import available

        if dev.type != "cuda":
            raise ValueError(f"backend 'flashinfer' needs a CUDA device; this run is on {dev.type}")
        if not available():
            raise ValueError("backend 'flashinfer' needs the flashinfer package (pip install 'specattn[gpu]')")
        if engine in ("auto", "static"):
            raise ValueError("backend 'flashinfer' plans on the host every step, which the decode engine cannot "
                             "capture; pass engine='eager' with it, or use backend 'triton'")


def _integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def generation(max_new_tokens, k, temperature, top_p, seed, eos_token_id, vocab_size: int | None) -> None:
    """The numeric arguments of ``generate``."""
    _integer("max_new_tokens", max_new_tokens, 1)
    _integer("k", k, 0)
    if _real("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    p = _real("top_p", top_p)
    if not 0 < p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (1 = no nucleus filter), got {top_p}")
    if seed is not None:
        _integer("seed", seed)
    if eos_token_id is not None:
        _integer("eos_token_id", eos_token_id, 0, None if vocab_size is None else vocab_size - 1)


def prompt_ids(value, vocab_size: int) -> list[int]:
    """One prompt of token ids in ``[0, vocab_size)``: a sequence of ints, ``[n]`` or ``[1, n]`` (tensor, array or
    nested list). Returns the ids as a list."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"prompt_ids must be token ids, got a {type(value).__name__} ({value[:30]!r}); tokenize "
                        "the text first: rt.tokenizer(text).input_ids")
    if hasattr(value, "dtype") and hasattr(value, "shape"):  # a tensor or an array
        t = torch.as_tensor(value)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"prompt_ids must hold integer token ids, got a tensor of {t.dtype}")
        if t.ndim > 2 or t.ndim == 2 and t.shape[0] != 1:
            raise ValueError(f"prompt_ids has shape {tuple(t.shape)}: generate takes one prompt, [n] or [1, n] "
                             "(for many prompts use generate_batch)")
        ids = t.reshape(-1).tolist()
    else:
        try:
            seq = list(value)
        except TypeError:
            raise TypeError(f"prompt_ids must be a sequence of token ids, got {type(value).__name__}") from None
        if seq and all(isinstance(x, (list, tuple)) or hasattr(x, "shape") and getattr(x, "ndim", 0) > 0
                       for x in seq):
            if len(seq) != 1:
                raise ValueError(f"prompt_ids holds {len(seq)} prompts: generate takes one prompt, [n] or [1, n] "
                                 "(for many prompts use generate_batch)")
            return prompt_ids(seq[0], vocab_size)
        ids = []
        for i, x in enumerate(seq):
            if isinstance(x, torch.Tensor) and x.ndim == 0 and not x.is_floating_point() and x.dtype != torch.bool:
                x = int(x)
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                raise TypeError(f"prompt_ids[{i}] is {x!r} ({type(x).__name__}): token ids are integers")
            ids.append(int(x))
    if not ids:
        raise ValueError("prompt_ids is empty; give at least one token")
    for i, x in enumerate(ids):
        if not 0 <= x < vocab_size:
            raise ValueError(f"prompt_ids[{i}] is {x}, outside the vocabulary [0, {vocab_size})")
    return ids


def calibrated_prefix(ids: list[int], metadata: dict[str, str], owner) -> None:
    """Warn, once per ``owner`` (a runtime), when the artifact's calibration windows began with a special-token
    prefix (``window_prefix``, e.g. Gemma's ``<bos>``) that the prompt ``ids`` do not begin with.

    Not an error: the prompt may continue a text on purpose. But for such models the first token is the attention
    sink, so the chunks the calibrated p's select were measured on a state this prompt does not put the model in.
    Artifacts without ``window_prefix`` (written before it existed) and prefix-free tokenizers never warn.
    """
    if owner in _WARNED_PREFIX or "window_prefix" not in metadata:
        return
    prefix = json.loads(metadata["window_prefix"])
    if prefix and ids[: len(prefix)] != prefix:
        _WARNED_PREFIX.add(owner)
        warnings.warn(f"the prompt starts with {ids[:len(prefix)]} but the artifact was calibrated on windows "
                      f"starting with the tokenizer's special tokens {prefix} (its BOS); tokenize prompts with "
                      "rt.tokenizer(text).input_ids (special tokens on) for the quality calibration measured "
                      "(warned once per runtime)", stacklevel=3)
