"""SpecAttn runtime: load a calibration artifact, select KV chunks from draft attention, verify sparsely.

Lean by design: imports only torch, safetensors and transformers (triton/flashinfer when present). Nothing runs at
import time.
"""

from .artifact import Artifact, ArtifactError, load_artifact, save_artifact
from .runtime import SpecAttnRuntime
from .stats import GenerationOutput, GenerationStats

__version__ = "0.1.0"
__all__ = ["Artifact", "ArtifactError", "GenerationOutput", "GenerationStats", "SpecAttnRuntime", "load_artifact",
           "save_artifact", "__version__"]
