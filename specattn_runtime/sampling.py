"""Token choice and the speculative acceptance rules (greedy and rejection sampling), on the device.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft token ``x`` drawn from ``q`` is accepted with
probability ``min(1, p(x) / q(x))``; at the first rejection the token is resampled from ``norm(max(0, p - q))``;
if all ``k`` are accepted a bonus token comes from the target's next distribution. The emitted tokens then follow
the target distribution ``p`` exactly (here ``p`` is the target under *sparse* verification, so SpecAttn's output
distribution is the sparse target's; with every layer dense it is the target's own).

The ``*_device`` functions return tensors and never synchronise: the decode engine captures them in CUDA graphs,
and the eager loop calls the same functions (then reads the result), so both paths make the same choices.
Randomness comes from :mod:`.rng` (a hash of seed, step and slot), not from a ``torch.Generator``.
"""

from __future__ import annotations

import torch

from .rng import SLOT_ACCEPT, SLOT_FINAL, sample, uniform


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """float32 probabilities ``[..., V]`` after temperature and nucleus (top-p) filtering of the logits."""
    if not temperature > 0:
        raise ValueError("temperature must be > 0 for sampling; use temperature=0.0 for greedy decoding")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    return probs_device(logits, temperature, top_p if top_p < 1.0 else None)


def probs_device(logits: torch.Tensor, temperature, top_p=None) -> torch.Tensor:
    """:func:`logits_to_probs` without checks; ``temperature`` / ``top_p`` may be device tensors (one element),
    ``top_p=None`` skips the nucleus filter (its sort costs ~50 us over a 128K vocabulary)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token if the mass strictly before it is < top_p (the most likely token always stays)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def greedy_accept_device(draft_tokens: torch.Tensor, target_logits: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest prefix the target's argmax agrees with.

    ``draft_tokens`` int64 ``[k]``; ``target_logits`` ``[k + 1, V]`` (row ``i`` predicts the token after position
    ``i`` of the verified block). Returns ``(n int64 [1], emitted int64 [k + 1])``: the step emits
    ``emitted[: n + 1]`` (the accepted drafts, which equal the target's choices, then the target's own token).
    """
    target = target_logits.argmax(-1)  # [k + 1]
    agree = (target[:-1] == draft_tokens).long()
    return agree.cumprod(0).sum().view(1), target


def rejection_accept_device(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                            seed, step) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling over ``k`` drafted tokens, randomness from draw ``(seed, step)``.

    ``draft_probs`` ``[k, V]`` or ``[k + 1, V]`` with a zero last row (the ``q`` each token was drawn from),
    ``target_probs`` ``[k + 1, V]``. Returns ``(n int64 [1], emitted int64 [k + 1])`` as
    :func:`greedy_accept_device`: ``emitted[n]`` is the resample at the first rejection, or the bonus token.
    """
    k = draft_tokens.numel()
    dev = draft_tokens.device
    rows = torch.arange(k, device=dev)
    p = target_probs[rows, draft_tokens]
    q = draft_probs[rows, draft_tokens]
    u = uniform(seed, step, SLOT_ACCEPT, k, dev)
    # q(x) > 0 for a token actually drawn from q; accept when u < p/q  <=>  u * q < p
    n = (u * q < p).long().cumprod(0).sum().view(1)
    if draft_probs.shape[0] == k:  # the bonus row: nothing to subtract
        draft_probs = torch.cat([draft_probs, draft_probs.new_zeros(1, draft_probs.shape[1])])
    p_n = target_probs.index_select(0, n)[0]
    residual = (p_n - draft_probs.index_select(0, n)[0]).clamp_min(0.0)
    # residual mass 0 only when p == q, where rejection has probability 0; fall back to p for safety
    dist = torch.where(residual.sum() > 0, residual, p_n)
    nxt = sample(dist, seed, step, SLOT_FINAL)
    emitted = torch.cat([draft_tokens, nxt])
    return n, torch.where(torch.arange(k + 1, device=dev) == n, nxt, emitted)


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """:func:`greedy_accept_device`, read back: ``(n_accepted, next_token)``."""
    n, emitted = greedy_accept_device(draft_tokens, target_logits)
    n = int(n)
    return n, int(emitted[n])


def speculative_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       seed: int, step: int) -> tuple[int, int]:
    """:func:`rejection_accept_device`, read back: ``(n_accepted, next_token)``."""
    n, emitted = rejection_accept_device(draft_tokens, draft_probs, target_probs, seed, step)
    n = int(n)
    return n, int(emitted[n])


# -- many sequences at once: one row per sequence, each with its own seed and step counter ---------------------------

def greedy_accept_batch(draft_tokens: torch.Tensor, target_logits: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`greedy_accept_device` per row: ``draft_tokens`` int64 ``[B, k]``, ``target_logits`` ``[B, k + 1, V]``
    -> ``(n int64 [B], emitted int64 [B, k + 1])``."""
    target = target_logits.argmax(-1)  # [B, k + 1]
    agree = (target[:, :-1] == draft_tokens).long()
    return agree.cumprod(1).sum(1), target


def rejection_accept_batch(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                           seed: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rejection_accept_device` per row, row ``b`` drawing at ``(seed[b], step[b])``: the same numbers the
    one-sequence function draws for that sequence, so its tokens do not depend on its neighbours.

    ``draft_tokens`` int64 ``[B, k]``; ``draft_probs`` ``[B, k + 1, V]`` with a zero last row; ``target_probs``
    ``[B, k + 1, V]``; ``seed`` / ``step`` int64 ``[B, 1]``. Returns ``(n int64 [B], emitted int64 [B, k + 1])``.
    """
    b, k = draft_tokens.shape
    dev = draft_tokens.device
    tok = draft_tokens[..., None]
    p = target_probs[:, :k].gather(-1, tok)[..., 0]  # [B, k]
    q = draft_probs[:, :k].gather(-1, tok)[..., 0]
    u = uniform(seed, step, SLOT_ACCEPT, k, dev)  # [B, k]
    n = (u * q < p).long().cumprod(1).sum(1)  # [B]
    at_n = n.view(b, 1, 1).expand(b, 1, target_probs.shape[-1])
    p_n = target_probs.gather(1, at_n)[:, 0]  # [B, V]
    residual = (p_n - draft_probs.gather(1, at_n)[:, 0]).clamp_min(0.0)
    dist = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    nxt = sample(dist, seed, step, SLOT_FINAL)  # [B, 1]
    emitted = torch.cat([draft_tokens, nxt], dim=1)
    return n, torch.where(torch.arange(k + 1, device=dev) == n[:, None], nxt, emitted)
