"""The static-shape decode engine: preallocated caches with device-side lengths, attention that reads them, and
speculative (or autoregressive) steps captured as CUDA graphs. ``SpecAttnRuntime.generate`` uses it on CUDA."""

from .forward import ForwardContext, engine_attention, make_forward
from .kv import KVStore
from .step import SAMPLING_MODES, DecodeEngine, SparsePlan, StepTimes

__all__ = ["DecodeEngine", "ForwardContext", "KVStore", "SAMPLING_MODES", "SparsePlan", "StepTimes",
           "engine_attention", "make_forward"]
