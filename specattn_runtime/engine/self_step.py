"""Self-speculation in the decode engine: the target drafts for itself with sparse attention, then verifies densely.

One model, one KV cache (role ``"target"`` of the :class:`KVStore`). State as in :class:`DecodeEngine`: ``L``
positions cached (verified), ``cur`` the last emitted token (at position ``L``, not cached). A step replays four
phases:

1. ``draft``: ``k`` one-token forwards of the target at positions ``L .. L + k - 1`` (first over ``cur``, then
   over each drafted token), writing their K/V. Sparse layers read only ``idx[:count]``: the chunks the previous
   round selected, plus every chunk from the one holding position ``L - 1`` on (keys written since that
   selection); dense layers (p = 1, e.g. the first ``dense_layers``) read everything;
2. ``verify``: one dense ``k + 1``-token forward at ``L .. L + k``. It rewrites the draft's K/V at those
   positions, so the cache and the logits are exactly the model's own (lossless), and its sparse layers add the
   chunk-pooled attention mass of the ``k + 1`` queries (summed over queries, averaged over heads) to one score
   row per layer, inside the attention kernel;
3. ``accept``: greedy or rejection sampling on the device, the drafts' distributions coming from the sparse
   drafting; ``L += accepted + 1`` (rollback is the length update, as in the draft-model engine);
4. ``select``: per sparse layer, top-p (the plan's p) over its recorded row, sink chunk and every chunk from the
   newest verified one on always kept; the result is the next round's ``idx`` / ``count``.

Selection is per layer (head-averaged: one chunk set shared by all KV heads). The kernels could do per KV head
(the draft-model engine does: per-head recording and per-head index lists), but this engine has not been moved
over yet, so it refuses a per-head plan; the eager loop (``selfspec.py``) selects per KV head, so the two paths
may read slightly different chunks (both are lossless: only the acceptance differs).

The first round after :meth:`start` drafts densely (every chunk selected): no attention has been recorded yet,
and recording the prompt's last queries would need one more forward. Its acceptance is then the dense draft's.
"""

from __future__ import annotations

import torch

from .forward import ForwardContext, active
from .kv import KVStore
from .step import DecodeEngine, SparsePlan, read_share


def self_plan(sparse_layers, top_p, chunk_size: int = 16) -> SparsePlan:
    """A :class:`SparsePlan` for self-speculation: each sparse layer is guided by its own recorded attention."""
    layers = tuple(int(j) for j in sparse_layers)
    return SparsePlan(layers, layers, tuple(float(p) for p in top_p), chunk_size)


class SelfSpecEngine(DecodeEngine):
    """Static-shape self-speculative decoding of one model over ``store.kv["target"]``.

    Parameters are :class:`DecodeEngine`'s, with these differences: ``plan`` names the layers that *draft*
    sparsely and their p (build it with :func:`self_plan`; ``draft_layers`` must equal ``sparse_layers``), ``k >=
    1``, ``forwards`` needs only ``"target"``, and ``record_launch`` optionally sets the Triton launch of the
    recording verification attention (``num_warps``, ``num_stages``, ``chunks_per_iter``: speed only;
    ``bench/self_record_sweep.py`` measures them). ``kv_read_sum`` reports, per sparse layer, the fraction of the
    keys visible to the last drafting forward of each step (``L + k``) that the drafts read, summed over steps.

    Typical use (what ``SpecAttnRuntime`` does for a ``self`` artifact on CUDA)::

        store = KVStore({"target": model}, capacity)
        eng = SelfSpecEngine(model, store, self_plan(sparse_layers, top_p, chunk_size), k,
                             {"target": make_forward(model, compile=True)}, sampling="greedy",
                             backend="triton", graphs=True)
        eng.capture()
        store.prefill("target", ids[:-1])
        eng.start(len(ids) - 1, ids[-1], ids[-2] if len(ids) > 1 else None, seed=seed, temperature=t, top_p=p)
        while ...: new_tokens = eng.step()
    """

    def __init__(self, target, store: KVStore, plan: SparsePlan, k: int, forwards: dict, *,
                 record_launch: dict | None = None, **kwargs):
        if k < 1:
            raise ValueError(f"self-speculation needs k >= 1 drafted tokens, got {k} (use DecodeEngine for k = 0)")
        if plan.per_head:
            raise ValueError("SelfSpecEngine selects one chunk set per layer; a per-KV-head plan (head_map) runs on "
                             "the draft-model DecodeEngine (or the eager self-speculation loop)")
        if plan.draft_sparse_layers:
            raise ValueError("sparse drafting (draft_sparse_layers) is for a draft model; a self-speculation plan's "
                             "sparse layers are already the drafting ones")
        if tuple(plan.draft_layers) != tuple(plan.sparse_layers):
            raise ValueError("a self-speculation plan guides each sparse layer by itself: draft_layers must equal "
                             f"sparse_layers (build it with self_plan), got {plan.draft_layers} vs "
                             f"{plan.sparse_layers}")
        super().__init__(target, store, plan, k, forwards, **kwargs)
        c = plan.chunk_size
        # The verification is dense and records; the drafting forwards (built by _draft_contexts) are the sparse ones.
        rows = {j: self.scores[r : r + 1] for r, j in enumerate(plan.record_layers)}
        self.verify_ctx = ForwardContext(store.kv["target"], self.verify_pos, self.verify_len, c, self.backend,
                                         record=rows, launch=dict(record_launch or {}), ring=store.ring["target"])
        self.all_chunks = torch.arange(self.idx.shape[1], dtype=torch.int32, device=self.device)

    def _draft_contexts(self) -> list[ForwardContext]:
        kv_t = self.store.kv["target"]
        sparse = {j: (self.idx[r : r + 1], self.count[r : r + 1]) for r, j in enumerate(self.plan.sparse_layers)}
        return [ForwardContext(kv_t, self.draft_pos[s : s + 1], self.draft_lens[s : s + 1], self.plan.chunk_size,
                               self.backend, sparse=sparse, ring=self.store.ring["target"]) for s in range(self.k)]

    def _phase_table(self) -> dict:
        # select last: it needs the accepted length (the next round's L), and the next draft needs its result
        phases = {"draft": self._draft, "verify": self._verify, "accept": self._accept_phase, "select": self._select}
        if not self.plan.sparse_layers:
            phases.pop("select")
        return phases

    # -- phases ----------------------------------------------------------------------------------------------------

    def _draft(self) -> None:
        k = self.k
        torch.add(self.L, self.offsets[:k], out=self.draft_pos[:k])  # L .. L + k - 1
        self.draft_lens[:k].copy_(self.draft_pos[:k] + 1)
        ids = self.cur
        for s in range(k):
            with active(self.draft_ctx[s]):
                logits = self.forwards["target"](ids, self.draft_pos[s : s + 1].view(1, 1))[0, -1]
            self.drafted[s : s + 1].copy_(self._choose(logits, s))
            ids = self.drafted[s : s + 1].view(1, 1)
        if self.plan.sparse_layers:  # share of the last draft forward's keys each sparse layer read (the newest
            c = self.plan.chunk_size  # chunk's padding past the last key is not a read)
            self.kv_read.add_(read_share(self.count.double(), (self.L + k).double(), c).clamp(max=1.0))

    def _verify(self) -> None:
        self.scores.zero_()  # the dense verification adds this round's attention
        super()._verify()

    def _accept_phase(self) -> None:
        n, emitted = self._accept()
        self._emit(n, emitted)

    def _select(self) -> None:
        # The next round drafts positions L .. L + k - 1: chunks below ceil((L + k) / c) are candidates, and every
        # chunk from the one holding L - 1 (the newest verified key) on is read, holding the keys the drafts write.
        c = self.plan.chunk_size
        self._select_top_p(self.L + self.k, (self.L - 1).clamp(min=0) // c)

    # -- running ---------------------------------------------------------------------------------------------------

    def start(self, length: int, last_token: int, prev_token: int | None = None, **kwargs) -> None:
        """As :meth:`DecodeEngine.start`; the first round drafts densely (nothing has been recorded yet)."""
        # the token before the last is the draft-model engine's (its draft rewrites that position); unused here
        super().start(length, last_token, last_token if prev_token is None else prev_token, **kwargs)
        self._select_all(length + self.k)

    def capture(self) -> float:
        self._select_all(self.store.capacity)  # the warm-up drafts read real chunks, not an empty selection
        return super().capture()

    def _select_all(self, n_keys: int) -> None:
        self.idx.copy_(self.all_chunks.expand_as(self.idx))
        self.count.fill_(-(-n_keys // self.plan.chunk_size))
