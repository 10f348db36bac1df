"""Attention variants of Hugging Face models, and the check that refuses what a path does not implement.

transformers hands every attention function the variant of the layer it serves as keyword arguments:
``sliding_window`` (keys older than the window are invisible: key ``s`` is visible to query ``t`` iff
``t - window < s <= t``), ``softcap`` (logits pass through ``softcap * tanh(logits / softcap)`` before the mask),
``s_aux`` (attention sinks: one learned logit per query head that joins the softmax and is dropped after it), and
``scaling`` (custom, e.g. ``query_pre_attn_scalar``). :func:`variant_of` reads them, so each of our functions
follows the layer it is called for, not a per-model guess.

Which paths implement which variants:

- the recording function (calibration, :mod:`specattn_runtime.capture`) and the evaluation function
  (:mod:`pipelines.sparse_eval`): all of the above (torch, exact);
- the runtime's eager loop and the decode engine with the torch or Triton backend (draft recording, sparse
  verification, dense decoding, the Triton kernels' every mode): all of the above; a sparse layer never reads
  outside its window, whatever the selection;
- FlashInfer's block-sparse wrapper: plain causal attention with any scaling only; the variants are refused by
  :func:`check_supported` (``variants=False``) before a model runs.

Layer types other than full and sliding attention (chunked, linear, convolutional, state-space layers) are refused
everywhere, with the model type and the feature in the message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


@dataclass(frozen=True)
class Variant:
    """The attention variant of one call. ``sinks``: float ``[H]``, one logit per query head."""

    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        return self.window is None and self.softcap is None and self.sinks is None


PLAIN = Variant()


def variant_of(kwargs: dict) -> Variant:
    """The variant an attention function was called with (transformers' keyword names)."""
    window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    return Variant(int(window) if window else None, float(softcap) if softcap else None, sinks)


def visible(tq: int, tk: int, window: int | None, device=None) -> torch.Tensor:
    """bool ``[tq, tk]``: keys visible to queries at the last ``tq`` of ``tk`` positions (causal, within window)."""
    q = torch.arange(tk - tq, tk, device=device)[:, None]
    k = torch.arange(tk, device=device)[None, :]
    m = k <= q
    if window is not None:
        m &= k > q - window
    return m


def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def softmax_with_sinks(logits: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """float32 softmax over the last axis of ``logits`` ``[B, H, Tq, Tk]``, with one sink logit per head (its
    probability is dropped: the row then sums to less than 1, as in transformers)."""
    if sinks is None:
        return torch.softmax(logits, dim=-1, dtype=torch.float32)
    b, h, tq, _ = logits.shape
    sink = sinks.reshape(1, h, 1, 1).to(logits.dtype).expand(b, h, tq, 1)
    return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]


def _config_name(config) -> tuple[object, str]:
    """``(text config, model type)``; a heterogeneous config (per-layer head counts, windows...: transformers'
    ``per_layer_config``) is refused here, before any per-layer attribute is read as if it were global."""
    cfg = getattr(config, "text_config", None) or config
    name = getattr(cfg, "model_type", type(cfg).__name__)
    if getattr(cfg, "is_heterogeneous", False):
        raise ValueError(f"model type {name!r} has per-layer values of {sorted(cfg.per_layer_attributes)} (a "
                         "heterogeneous config); SpecAttn reads one value per model and does not implement that")
    return cfg, name


def model_features(config) -> dict[str, object]:
    """The variant features a config turns on, as ``{feature: value}`` (empty for plain causal attention)."""
    cfg, _ = _config_name(config)
    found: dict[str, object] = {}
    kinds = set(getattr(cfg, "layer_types", None) or [])
    window = getattr(cfg, "sliding_window", None)
    if window and ("sliding_attention" in kinds or (not kinds and getattr(cfg, "use_sliding_window", True))):
        found["sliding-window attention"] = f"sliding_window={window}"
    if getattr(cfg, "attn_logit_softcapping", None):
        found["attention logit soft-capping"] = f"attn_logit_softcapping={cfg.attn_logit_softcapping}"
    if getattr(cfg, "model_type", "") == "gpt_oss":  # other models' sinks are caught per call (hooks.py)
        found["attention sinks"] = "learned sink logits per head"
    return found


def layer_windows(config) -> list[int | None]:
    """Per decoder layer: its sliding window, or None for full attention (transformers' own reading of the config)."""
    cfg, _ = _config_name(config)
    window = getattr(cfg, "sliding_window", None)
    kinds = getattr(cfg, "layer_types", None)
    if kinds is None:  # one attention type for the whole model (Mistral: a window on every layer when set)
        on = bool(window) and getattr(cfg, "use_sliding_window", True)
        return [window if on else None] * cfg.num_hidden_layers
    return [window if k == "sliding_attention" else None for k in kinds]


def check_supported(config, *, variants: bool, triton: bool = False) -> None:
    """Raise ``ValueError`` naming the model type and the feature if our attention would differ from the model's.

    ``variants``: the path implements sliding windows, soft-capping and sinks (every path but FlashInfer's).
    ``triton``: also check the head dim against the kernels (powers of two, 16-256).
    """
    cfg, name = _config_name(config)
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds - SUPPORTED_LAYER_TYPES:
        raise ValueError(f"model type {name!r} has layer types {sorted(kinds - SUPPORTED_LAYER_TYPES)}; SpecAttn "
                         f"implements {sorted(SUPPORTED_LAYER_TYPES)} only")
    if getattr(cfg, "attention_chunk_size", None):
        raise ValueError(f"model type {name!r} uses chunked attention (attention_chunk_size="
                         f"{cfg.attention_chunk_size}), which SpecAttn's attention does not implement")
    if not variants:
        for feature, value in model_features(cfg).items():
            raise ValueError(f"model type {name!r} uses {feature} ({value}), which FlashInfer's block-sparse "
                             "wrapper does not implement; its output would differ from the model's. The torch and "
                             "Triton backends (both engines), calibration and evaluation implement it")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if triton and (head_dim & (head_dim - 1) or not 16 <= head_dim <= 256):
        raise ValueError(f"model type {name!r} has head_dim {head_dim}; the kernels take powers of two in [16, 256]")
