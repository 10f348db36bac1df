"""Loading Hugging Face causal LMs from local directories, with errors that say what is wrong.

The runtime never reaches a hub: every model is a local directory holding ``config.json``, weights
(``*.safetensors``) and a fast tokenizer (``tokenizer.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def check_model_dir(path: str | Path, role: str = "model") -> Path:
    """Return ``path`` as a Path if it looks like a local HF causal-LM directory, else raise naming what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{role} path {p} does not exist (models are local directories; no hub downloads)")
    if not p.is_dir():
        raise ValueError(f"{role} path {p} is a file; pass the model directory that holds config.json")
    if not (p / "config.json").exists():
        raise ValueError(f"{role} path {p} has no config.json: not a Hugging Face model directory")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ValueError(f"{role} path {p} has no weight files (*.safetensors or *.bin)")
    return p


def num_layers(model_dir: str | Path) -> int:
    """Decoder layer count read from ``config.json`` without building the model."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return int(cfg["num_hidden_layers"])


def layer_windows_of(model_dir: str | Path) -> list[int | None]:
    """Per decoder layer of the model in ``model_dir``: its sliding window, or None (read from its config alone)."""
    from transformers import AutoConfig

    from .variants import layer_windows

    return layer_windows(AutoConfig.from_pretrained(str(model_dir)))


def load_causal_lm(path: str | Path, *, role: str = "model", dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", attn_implementation: str | None = None):
    """Load a local causal LM in eval mode.

    Parameters
    ----------
    path : str or Path
        Model directory (``config.json`` + weights).
    role : str
        Used in error messages ("draft", "target").
    attn_implementation : str, optional
        A name registered with transformers' ``AttentionInterface`` (see :mod:`specattn_runtime.capture`).
    """
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path, role)
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    return model.to(device).eval()


def load_tokenizer(path: str | Path, role: str = "model"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_model_dir(path, role))


_PROBE = "The window starts here."


def special_prefix(tokenizer) -> list[int]:
    """The ids ``tokenizer`` puts before any text by default: ``[bos_id]`` where it adds a BOS, ``[]`` where not.

    Read off the tokenizer itself (the same text with and without special tokens), not from a list of model
    names, so a tokenizer configured either way is followed. A suffix some tokenizers append (EOS) is not part of
    it: windows are cut from running text, and a prompt does not end a document.
    """
    plain = tokenizer(_PROBE, add_special_tokens=False).input_ids
    full = tokenizer(_PROBE).input_ids
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    raise ValueError(f"{type(tokenizer).__name__} tokenizes {_PROBE!r} as {plain} without special tokens and "
                     f"{full} with them; the second does not contain the first, so its special-token prefix "
                     "cannot be told apart from the text")
