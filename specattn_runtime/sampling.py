"""Token choice and the speculative acceptance rules (greedy and rejection sampling).

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft token ``x`` drawn from ``q`` is accepted with
probability ``min(1, p(x) / q(x))``; at the first rejection the token is resampled from ``norm(max(0, p - q))``;
if all ``k`` are accepted a bonus token comes from the target's next distribution. The emitted tokens then follow
the target distribution ``p`` exactly (here ``p`` is the target under *sparse* verification, so SpecAttn's output
distribution is the sparse target's; with every layer dense it is the target's own).
"""

from __future__ import annotations

import torch


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """float32 probabilities ``[..., V]`` after temperature and nucleus (top-p) filtering of the logits."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling; use temperature=0.0 for greedy decoding")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token if the mass strictly before it is < top_p (the most likely token always stays)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Accept the longest prefix the target's argmax agrees with.

    ``draft_tokens`` int64 ``[k]``; ``target_logits`` ``[k + 1, V]`` (row ``i`` predicts the token after
    position ``i`` of the verified block). Returns ``(n_accepted, next_token)``.
    """
    target = target_logits.argmax(-1)  # [k + 1]
    agree = (target[:-1] == draft_tokens).long()
    n = int(agree.cumprod(0).sum())
    return n, int(target[n])


def speculative_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """Rejection sampling over ``k`` drafted tokens.

    ``draft_probs`` ``[k, V]`` (the ``q`` each token was drawn from), ``target_probs`` ``[k + 1, V]``.
    Returns ``(n_accepted, next_token)``: ``next_token`` is the resample at the first rejection, or the bonus.
    """
    k = draft_tokens.numel()
    idx = torch.arange(k)
    p = target_probs[idx, draft_tokens]
    q = draft_probs[idx, draft_tokens]
    u = torch.rand(k, generator=generator, device=draft_probs.device)
    # q(x) > 0 for a token actually drawn from q; accept when u < p/q  <=>  u * q < p
    accepted = (u * q < p).long().cumprod(0)
    n = int(accepted.sum())
    if n == k:
        dist = target_probs[k]
    else:
        residual = (target_probs[n] - draft_probs[n]).clamp_min(0.0)
        # residual mass 0 only when p == q, where rejection has probability 0; fall back to p for safety
        dist = residual if residual.sum() > 0 else target_probs[n]
    return n, int(torch.multinomial(dist / dist.sum(), 1, generator=generator))
