"""Per-layer attention statistics of a model over token windows, and the draft/target KL matrix.

Rows are head-averaged attention of "decode-like" query positions (past the first ``prefill_fraction`` of each
window, as in the evaluation protocol), pooled to chunks. One window is run at a time and only the pooled rows
are kept, so memory stays at one layer's ``[heads, T, T]`` scores plus ``[layers, queries, chunks]``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specattn_runtime import capture
from specattn_runtime.models import load_causal_lm
from specattn_runtime.pooling import num_chunks
from specattn_runtime.variants import check_supported


def query_positions(window: int, n_queries: int, prefill_fraction: float = 0.1) -> torch.Tensor:
    """int64 ``[n]``: evenly spaced positions in ``[ceil(prefill_fraction * window), window - 1]``, no repeats."""
    start = math.ceil(prefill_fraction * window)
    if start >= window:
        raise ValueError(f"window of {window} tokens leaves no decode positions after prefill {prefill_fraction}")
    pos = torch.linspace(start, window - 1, steps=n_queries).round().long()
    return torch.unique(pos)


def valid_chunks(positions: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Chunks a query at each position can see (itself included): int64 ``[n]``."""
    return positions // chunk_size + 1


@functools.lru_cache(maxsize=1)
def recording_model(model_dir: str, role: str = "model"):
    """The model under the recording attention, loaded once per process and kept for the next call on the same
    directory (a Dask worker computing several shards of one model loads it once). One model at a time:
    ``recording_model.cache_clear()`` frees it."""
    # a worker with a GPU (a Dask worker started with resources GPU=1) runs its passes there
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(model_dir, role=role, attn_implementation=capture.register(), device=device)
    check_supported(model.config, variants=True)  # refuses by name what the recording would get wrong
    return model


@torch.no_grad()
def collect_pooled_attention(model_dir: str | Path, windows: torch.Tensor, positions: torch.Tensor,
                             chunk_size: int, *, role: str = "model", progress: bool = True,
                             per_kv_head: bool = False):
    """Run ``model_dir`` over every window and return pooled attention rows.

    Parameters
    ----------
    windows : torch.Tensor
        int64 ``[n_windows, T]`` token ids.
    positions : torch.Tensor
        int64 ``[Q]`` query positions to keep.
    per_kv_head : bool
        Also return the rows of each KV head (its group of query heads averaged).

    Returns
    -------
    torch.Tensor
        float32 ``[n_layers, n_windows * Q, n_chunks(T)]``; row ``w * Q + q`` is window ``w``, position ``q``.
        With ``per_kv_head``: ``(rows, rows_kv)``, ``rows_kv`` float32 ``[n_layers, Hkv, n_windows * Q, C]``.
    """
    model = recording_model(str(model_dir), role)
    n_layers = model.config.num_hidden_layers
    c = num_chunks(windows.shape[1], chunk_size)
    out = torch.zeros(n_layers, windows.shape[0], positions.numel(), c)
    hkv = model.config.num_key_value_heads
    out_kv = torch.zeros(n_layers, hkv, windows.shape[0], positions.numel(), c) if per_kv_head else None
    dev = next(model.parameters()).device
    for w in tqdm(range(windows.shape[0]), desc=f"attention ({role})", disable=not progress, unit="window"):
        rec = capture.AttentionRecorder(positions.to(dev), chunk_size, per_kv_head=per_kv_head)
        model(windows[w : w + 1].to(dev), specattn_recorder=rec, use_cache=False, logits_to_keep=1)
        out[:, w] = rec.stacked(n_layers)[:, 0].cpu()
        if per_kv_head:
            out_kv[:, :, w] = torch.stack([rec.rows_kv[i][0] for i in range(n_layers)]).cpu()
    if per_kv_head:
        return out.flatten(1, 2), out_kv.flatten(2, 3)
    return out.flatten(1, 2)


def smooth(rows: torch.Tensor, n_valid: torch.Tensor, eps: float) -> torch.Tensor:
    """Add ``eps`` to each valid chunk and renormalise: rows become strictly positive distributions on their
    causal window (zeros elsewhere). ``rows`` ``[..., N, C]``, ``n_valid`` ``[N]``."""
    valid = torch.arange(rows.shape[-1])[None, :] < n_valid[:, None]  # [N, C]
    x = torch.where(valid, rows.double() + eps, 0.0)
    return x / x.sum(-1, keepdim=True)


def kl_matrix(target_rows: torch.Tensor, draft_rows: torch.Tensor, n_valid: torch.Tensor,
              eps: float = 1e-6) -> torch.Tensor:
    """``KL[j, i] = mean over rows of KL(target_j || draft_i)`` on chunk-level distributions.

    ``target_rows`` ``[Lt, N, C]``, ``draft_rows`` ``[Ld, N, C]``, ``n_valid`` ``[N]``; returns float32
    ``[Lt, Ld]``. ``sum t log t`` is computed once per target layer, the cross term as one matrix product.
    """
    if target_rows.shape[1:] != draft_rows.shape[1:]:
        raise ValueError(f"target rows {tuple(target_rows.shape)} and draft rows {tuple(draft_rows.shape)} "
                         "must cover the same windows and positions")
    t = smooth(target_rows, n_valid, eps)
    d = smooth(draft_rows, n_valid, eps)
    n = t.shape[1]
    t_logt = torch.where(t > 0, t * t.clamp_min(1e-300).log(), 0.0).sum((1, 2))  # [Lt]
    log_d = torch.where(d > 0, d.clamp_min(1e-300).log(), 0.0)  # zero where both are zero
    cross = t.flatten(1) @ log_d.flatten(1).T  # [Lt, Ld]
    kl = (t_logt[:, None] - cross) / n
    return kl.clamp_min(0.0).float()  # exact KL >= 0; clamp float rounding
