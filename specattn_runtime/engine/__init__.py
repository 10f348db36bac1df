"""The static-shape decode engine: preallocated caches with device-side lengths, attention that reads them, and
speculative (or autoregressive) steps captured as CUDA graphs. ``SpecAttnRuntime.generate`` uses it on CUDA;
:class:`SelfSpecEngine` is the same machinery for self-speculation (one model drafting sparsely for itself)."""

from .forward import ForwardContext, engine_attention, make_forward
from .kv import KVStore
from .self_step import SelfSpecEngine, self_plan
from .step import SAMPLING_MODES, DecodeEngine, SparsePlan, StepTimes

__all__ = ["DecodeEngine", "ForwardContext", "KVStore", "SAMPLING_MODES", "SelfSpecEngine", "SparsePlan",
           "StepTimes", "engine_attention", "make_forward", "self_plan"]
