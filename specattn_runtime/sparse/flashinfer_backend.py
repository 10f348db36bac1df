"""FlashInfer backend: ``BlockSparseAttentionWrapper`` with block = chunk, used when ``flashinfer`` imports.

Plan/run split: :meth:`FlashInferSparse.plan` builds the BSR description of one selection (FlashInfer's plan
reads it on the host: a device sync, the overhead the paper blames for its slowdown), :meth:`run` computes.
FlashInfer's block-sparse mask has no causal structure inside a block row, so the verified queries see all
selected keys including the later drafted ones of their own block row; use it for q_len = 1, or accept that.
"""

from __future__ import annotations

import inspect

import torch


def available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


class FlashInferSparse:
    def __init__(self, device: torch.device | str, workspace_bytes: int = 128 * 1024 * 1024):
        import flashinfer

        self._workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self._wrapper = flashinfer.BlockSparseAttentionWrapper(self._workspace)

    def plan(self, idx: torch.Tensor, count: torch.Tensor, *, q_len: int, n_keys: int, num_qo_heads: int,
             num_kv_heads: int, head_dim: int, chunk_size: int, dtype: torch.dtype, scale: float | None = None):
        """One block row of ``q_len`` queries over the selected chunks ``idx[0, :count[0]]`` (batch 1)."""
        if n_keys % chunk_size:
            raise ValueError(f"FlashInfer needs the key count ({n_keys}) to be a multiple of chunk_size")
        n = int(count[0])  # host sync
        indptr = torch.tensor([0, n], dtype=torch.int32, device=idx.device)
        kwargs = {"q_data_type": dtype, "kv_data_type": dtype}
        params = inspect.signature(self._wrapper.plan).parameters
        if "sm_scale" in params and scale is not None:
            kwargs["sm_scale"] = scale
        self._wrapper.plan(indptr, idx[0, :n].contiguous(), q_len, n_keys, q_len, chunk_size, num_qo_heads,
                           num_kv_heads, head_dim, **{k: v for k, v in kwargs.items() if k in params})

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[q_len, H, D]``, ``k``/``v`` ``[n_keys, Hkv, D]`` (NHD) -> ``[q_len, H, D]``."""
        return self._wrapper.run(q, k, v)


def sparse_attention_flashinfer(q, k, v, chunk_mask, *, chunk_size: int, scale: float | None = None):
    """The shared contract (``q`` ``[1, H, Tq, D]``, ``k``/``v`` ``[1, Hkv, Tk, D]``) through plan + run."""
    from .triton_attn import mask_to_indices

    if q.shape[0] != 1:
        raise ValueError("the FlashInfer backend handles batch 1")
    idx, count = mask_to_indices(chunk_mask)
    fi = FlashInferSparse(q.device)
    _, h, tq, d = q.shape
    fi.plan(idx, count, q_len=tq, n_keys=k.shape[2], num_qo_heads=h, num_kv_heads=k.shape[1], head_dim=d,
            chunk_size=chunk_size, dtype=q.dtype, scale=scale)
    out = fi.run(q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(),
                 v[0].transpose(0, 1).contiguous())
    return out.transpose(0, 1)[None]
