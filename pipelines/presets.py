"""Named draft/target model pairs that ship as packages (DESIGN.md section 7)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .assets import QWEN_05B_GGUF, QWEN_15B_GGUF, SMOLLM2_GGUF, ConvertedModel, convert

# Early-exit draft depth for SmolLM2-135M (30 layers). Chosen by measurement, see README "Model pairs".
QUICK_DRAFT_LAYERS = 10


@dataclass(frozen=True)
class PairPreset:
    name: str
    draft: ConvertedModel
    target: ConvertedModel
    description: str

    def ensure(self) -> tuple[Path, Path]:
        """Fetch and convert both models if needed; return ``(draft_dir, target_dir)``."""
        draft, target = convert([self.draft, self.target])
        return draft, target


PAIRS: dict[str, PairPreset] = {
    "quick": PairPreset(
        "quick",
        draft=ConvertedModel(f"smollm2-135m-instruct-exit{QUICK_DRAFT_LAYERS}", SMOLLM2_GGUF, QUICK_DRAFT_LAYERS),
        target=ConvertedModel("smollm2-135m-instruct", SMOLLM2_GGUF),
        description=f"SmolLM2-135M-Instruct target, its first {QUICK_DRAFT_LAYERS} layers as early-exit draft",
    ),
    "qwen-coder": PairPreset(
        "qwen-coder",
        draft=ConvertedModel("qwen2.5-coder-0.5b-instruct", QWEN_05B_GGUF),
        target=ConvertedModel("qwen2.5-coder-1.5b-instruct", QWEN_15B_GGUF),
        description="Qwen2.5-Coder-0.5B-Instruct draft, Qwen2.5-Coder-1.5B-Instruct target (the faithful pair)",
    ),
}


def check_pair(preset: str | None, draft: str | None, target: str | None) -> None:
    """Both model directories (existing, with a config) or neither and a known preset; no download."""
    if draft and target:
        from specattn_runtime.models import check_model_dir

        for path, role in ((draft, "draft"), (target, "target")):
            check_model_dir(path, role)
            _check_attention(path)
        return
    if draft or target:
        raise ValueError("pass both draft and target model paths, or neither (and a preset)")
    if preset not in PAIRS:
        raise ValueError(f"unknown preset {preset!r}; presets are {sorted(PAIRS)}, or pass draft= and target=")


def _check_attention(model_dir: str) -> None:
    """Refuse, before any model loads, an architecture whose attention calibration would get wrong."""
    from transformers import AutoConfig

    from specattn_runtime.variants import check_supported

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError):  # an unknown architecture: loading it reports that, with its name
        return
    check_supported(config, variants=True)


def model_folder_name(model_dir: str) -> str:
    """A model directory's name reduced to a safe folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_dir).expanduser().resolve().name).strip(".-") or "model"


def custom_pair_name(draft: str, target: str) -> str:
    """``<draft dir name>__<target dir name>``, reduced to a safe folder name (never a preset's name)."""
    name = "__".join(model_folder_name(p) for p in (draft, target))
    return name if name not in PAIRS else f"custom-{name}"


def resolve_pair(preset: str | None, draft: str | None, target: str | None) -> tuple[str, str, str]:
    """``(draft_dir, target_dir, pair_name)`` from two local model directories or a preset (fetched if needed)."""
    if draft and target:  # a custom pair: its artifacts go under a folder named after the two models
        return draft, target, custom_pair_name(draft, target)
    check_pair(preset, draft, target)
    d, t = PAIRS[preset].ensure()
    return str(d), str(t), preset
