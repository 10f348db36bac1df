"""Mixture-of-experts layers a CUDA graph can capture: every expert on every token, for decode-sized forwards.

transformers' default experts implementation (``grouped_mm``) sorts the token-expert pairs and groups them by
expert with data-dependent sizes; on the H200 its forward copied between host and device, which a CUDA graph cannot
capture ("Cannot copy between CPU and CUDA tensors during CUDA graph capture"). For the few tokens of a
decode forward (``k + 1`` per sequence) this module computes every expert on every token with static shapes and
weights the outputs by the routing weights scattered into a dense ``[T, E]`` matrix (zero where a token was not
routed). A decode step reads every expert's weights anyway, so the extra multiplications are nearly free while the
forward is memory-bound; nothing depends on the routing's values, nothing is copied to the host.

The contract: :func:`capturable_experts_forward` equals transformers' ``batched_mm`` / ``grouped_mm`` /
``eager`` experts on the same inputs (tests/test_moe.py), up to the order of a float32 sum over the routed
experts. Larger forwards (prefill chunks) are delegated to ``grouped_mm``, except while a CUDA graph is being
captured or ``torch.compile`` traces (the runtime compiles only forwards it captures), where shapes must stay
static whatever their size. :func:`use_capturable_experts` switches a model, where its transformers allows it.
"""

from __future__ import annotations

import torch

NAME = "specattn_dense"  # the key in transformers' ExpertsInterface
# Dense up to this many tokens per forward, delegated beyond it (outside graph capture and compilation). The dense
# path does E / top_k times the routed multiplications; reading bf16 weights it stays memory-bound up to roughly
# the GPU's FLOP-per-byte ridge (~200 tokens on an H200), and every captured single-sequence step is far below it.
DENSE_MAX_TOKENS = 256


def _batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    is_transposed: bool) -> torch.Tensor:
    """``x`` [T, in] (every expert's input) or [E, T, in]; ``weight`` [E, in, out] when transposed, else
    [E, out, in]; ``bias`` [E, out]. Returns [E, T, out]: batched_mm's ``_batched_linear`` over all experts."""
    out = torch.matmul(x, weight if is_transposed else weight.transpose(-2, -1))
    return out if bias is None else out + bias.unsqueeze(1)


def dense_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the dense routing matrix.

    Parameters
    ----------
    self : an experts module decorated with transformers' ``use_experts_implementation`` (its attributes
        ``has_gate``, ``has_bias``, ``is_transposed``, ``gate_up_proj`` or ``up_proj``, ``down_proj``, biases).
    hidden_states : [T, H]
    top_k_index : int64 [T, K], expert ids in ``[0, E)``
    top_k_weights : [T, K], the routing weights (zero weights are allowed; a repeated id adds up)

    Returns
    -------
    [T, H] in ``hidden_states.dtype``.
    """
    if getattr(self, "_is_expert_parallel", False):  # attribute absent in older transformers: never parallel there
        raise ValueError("the dense (capturable) experts compute every expert locally and do not implement expert "
                         "parallelism; load the model without an expert-parallel plan, or keep transformers' "
                         "experts implementation (engine='eager')")
    n_experts, n_tokens = self.num_experts, hidden_states.size(0)
    bias = self.has_bias
    if self.has_gate:
        proj = _batched_linear(hidden_states, self.gate_up_proj, self.gate_up_proj_bias if bias else None,
                               self.is_transposed)  # [E, T, 2I]
    else:
        proj = _batched_linear(hidden_states, self.up_proj, self.up_proj_bias if bias else None,
                               self.is_transposed)  # [E, T, I]
    # The gate (or activation) sees rows as batched_mm gives them: 2-D, one per (expert, token) pair
    proj = proj.reshape(n_experts * n_tokens, -1)
    proj = self._apply_gate(proj) if self.has_gate else self.act_fn(proj)  # [E * T, I]
    out = _batched_linear(proj.view(n_experts, n_tokens, -1), self.down_proj,
                          self.down_proj_bias if bias else None, self.is_transposed)  # [E, T, H]
    if getattr(self, "has_post_expert_norm", False):  # newer transformers only
        out = self.post_expert_norm(out.reshape(n_experts * n_tokens, -1)).view(n_experts, n_tokens, -1)
    # Routing weights as a dense matrix: zeros where a token was not routed drop the expert from its sum
    dense = torch.zeros(n_tokens, n_experts, dtype=top_k_weights.dtype, device=top_k_weights.device)
    dense.scatter_add_(1, top_k_index, top_k_weights)  # [T, E]
    weighted = out * dense.t().unsqueeze(-1)  # [E, T, H], batched_mm's weighted_out in the same dtype
    # batched_mm sums the top_k products accumulating in float32, then casts to the input dtype
    return weighted.sum(dim=0, dtype=torch.float32).to(hidden_states.dtype)


def _static_shapes_needed(hidden_states: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # fullgraph, static shapes: the runtime compiles only the forwards it captures
        return True
    return hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()


def capturable_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """The registered implementation: dense for decode-sized forwards, captures and compiled code; otherwise
    transformers' ``grouped_mm`` (the token count is fixed within one captured graph, so this branch is static)."""
    if hidden_states.size(0) <= DENSE_MAX_TOKENS or _static_shapes_needed(hidden_states):
        return dense_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _decorated(experts: torch.nn.Module) -> bool:
    """Whether an experts module dispatches through the ExpertsInterface (``use_experts_implementation`` sets these
    attributes in ``__init__`` and wraps ``forward``)."""
    return (all(hasattr(experts, a) for a in ("config", "has_gate", "has_bias", "is_transposed", "down_proj"))
            and hasattr(type(experts).forward, "__wrapped__"))


def use_capturable_experts(model: torch.nn.Module) -> bool:
    """Switch ``model``'s mixture-of-experts layers to :func:`capturable_experts_forward`, in place.

    Returns True when every experts module of the model now dispatches to it; False where this transformers cannot
    switch them (the model keeps its own experts): no ``ExpertsInterface`` or ``set_experts_implementation``, a model
    class that does not support setting its experts implementation, or experts modules replaced by other code (e.g.
    a quantized kernel) that do not dispatch through the interface. Raises ``ValueError`` for expert-parallel models.
    """
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if not callable(can_set) or not callable(getattr(model, "set_experts_implementation", None)) or not can_set():
        return False
    experts = [m.experts for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)]
    if not experts or not all(_decorated(e) for e in experts):
        return False
    if any(getattr(e, "_is_expert_parallel", False) for e in experts):
        raise ValueError(f"{type(model).__name__} is expert-parallel; the capturable experts compute every expert "
                         "locally: load it without an expert-parallel plan, or run engine='eager'")
    ExpertsInterface.register(NAME, capturable_experts_forward)  # class-wide, idempotent
    model.set_experts_implementation(NAME)
    return all(e.config._experts_implementation == NAME for e in experts)
