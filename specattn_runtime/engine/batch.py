"""The batched decode engine: one speculative step for up to ``max_batch`` sequences over a paged KV pool.

The same step as :class:`~specattn_runtime.engine.step.DecodeEngine` (and :class:`SelfSpecEngine` for mode
``self``) with a batch dimension everywhere: every buffer has one row per batch *slot*, a step runs on the first
``b`` slots (``b`` a bucket from :data:`BUCKETS`, the live sequences packed first, the rest padding), and each
phase is a static-shape function of those rows, captured as one CUDA graph per bucket (``graphs.py``).

Per slot (sequence) on the device: ``L`` (positions its caches hold), ``cur`` (last emitted token, the next
step's first query), ``prev`` (the token at ``L - 1``), its seed and step counter (the counter RNG draws row
``b`` from ``(seed[b], step[b])``, so a sequence's samples never depend on its neighbours), temperature, top-p, and
its page-table row (int32; padded slots point at the scratch page) and, where the pool keeps rings for window
layers, its ring-page row (``ring_table``). Rollback after rejection is ``L += n + 1`` per row (a ring is sized so
that the rejected writes never reach a key the next step reads, ``ring.py``). One host read per step:
``out [b, k + 2]`` (tokens emitted, then the tokens).

Modes (``mode``):

- ``"draft"``: the draft model drafts ``k`` tokens (the first forward over ``[prev, cur]``), its mapped layers record
  chunk-pooled rows per slot (with sparse drafting the first forward also records the sparse-drafting layers, one
  top-p launch over every (slot, draft layer[, KV head]) row follows it, and the other ``k - 1`` forwards read
  those chunks in those layers); one top-p launch selects every (slot, sparse layer[, KV head]) row; the target
  verifies ``b x (k + 1)`` tokens reading per-slot chunk lists; ``k = 0`` is batched autoregressive decoding;
- ``"self"``: the target drafts for itself over the chunks its last dense verification attended to (per layer),
  then verifies densely and records (lossless).
"""

from __future__ import annotations

import torch

from ..rng import SLOT_FINAL, sample
from ..sampling import greedy_accept_batch, probs_device, rejection_accept_batch
from .forward import ForwardContext, active
from .pages import SCRATCH_PAGE, PagedKVPool
from .ring import MAX_FORWARD_TOKENS
from .step import (SAMPLING_MODES, SparsePlan, draft_selection_rows, read_share, selection_buffers, selection_rows,
                   topp_into)

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # batch sizes a step runs (and captures graphs) at


def bucket_for(n: int, max_batch: int) -> int:
    """The smallest bucket holding ``n`` sequences (``max_batch`` itself past the largest listed one)."""
    for b in BUCKETS:
        if b >= n:
            return min(b, max_batch)
    return max_batch


class BatchEngine:
    """Static-shape batched speculative decoding over a :class:`PagedKVPool`.

    Parameters
    ----------
    target : torch.nn.Module
        The target model (vocabulary size).
    pool : PagedKVPool
        Page pools with role ``"target"`` (and ``"draft"`` in mode ``draft`` with ``k >= 1``).
    plan : SparsePlan
        Sparse layers: verification layers in mode ``draft``, drafting layers in mode ``self`` (per layer only).
    k : int
        Drafted tokens per step (``0``: autoregressive; mode ``self`` needs ``k >= 1``).
    forwards : dict
        role -> ``forward(ids [b, Tq], positions [b, Tq]) -> logits [b, Tq, V]`` (``forward.make_forward``).
    max_batch : int
        Slots (rows of every buffer).
    max_pages : int
        Page-table width: pages of the longest sequence the engine may hold.
    sampling, backend : str
        As :class:`DecodeEngine`.
    """

    def __init__(self, target, pool: PagedKVPool, plan: SparsePlan, k: int, forwards: dict, *, max_batch: int,
                 max_pages: int, mode: str = "draft", sampling: str = "greedy", backend: str = "torch"):
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if mode not in ("draft", "self"):
            raise ValueError(f"mode must be 'draft' or 'self', got {mode!r}")
        if mode == "self" and (k < 1 or plan.per_head):
            raise ValueError("batched self-speculation needs k >= 1 and a per-layer plan (self_plan)")
        if pool.page_size % plan.chunk_size:
            raise ValueError(f"page size {pool.page_size} must be a multiple of the chunk size {plan.chunk_size}")
        if pool.ring_slots and k + 1 > MAX_FORWARD_TOKENS:  # the rings are sized for that many (ring.py)
            raise ValueError(f"k = {k}: a verification writes k + 1 tokens, more than the {MAX_FORWARD_TOKENS} the "
                             "pool's window-layer rings keep room for")
        self.target, self.pool, self.plan, self.k, self.mode = target, pool, plan, k, mode
        self.forwards, self.sampling, self.backend = forwards, sampling, backend
        self.max_batch, self.max_pages = int(max_batch), int(max_pages)
        self.device = dev = pool.device
        bm, c = self.max_batch, plan.chunk_size
        self.n_chunks = self.max_pages * pool.page_size // c
        cfg = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        vocab = cfg.vocab_size
        i64 = dict(dtype=torch.int64, device=dev)
        # -- per-slot state carried from step to step
        self.L = torch.zeros(bm, **i64)
        self.cur = torch.zeros(bm, 1, **i64)
        self.prev = torch.zeros(bm, 1, **i64)
        self.step_no = torch.zeros(bm, 1, **i64)
        self.seed = torch.zeros(bm, 1, **i64)
        self.temperature = torch.ones(bm, 1, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(bm, 1, dtype=torch.float32, device=dev)
        self.page_table = torch.full((bm, self.max_pages), SCRATCH_PAGE, dtype=torch.int32, device=dev)
        self.ring_table = torch.full((bm, pool.ring_pages), SCRATCH_PAGE, dtype=torch.int32, device=dev) \
            if pool.ring_slots else None
        ns = len(plan.sparse_layers)
        self.kv_read = torch.zeros(bm, ns, dtype=torch.float64, device=dev)  # summed fraction read, per slot/layer
        # -- per-step buffers
        self.offsets = torch.arange(k + 1, **i64)
        self.out = torch.zeros(bm, k + 2, **i64)
        self.verify_ids = torch.zeros(bm, k + 1, **i64)
        self.drafted = torch.zeros(bm, k + 1, **i64)
        self.tlogits = torch.zeros(bm, k + 1, vocab, dtype=next(target.parameters()).dtype, device=dev)
        self.q_probs = torch.zeros(bm, k + 1, vocab, dtype=torch.float32, device=dev) \
            if sampling != "greedy" and k else None  # the last row stays 0: the bonus position has no draft
        self._selection_buffers()
        if mode == "self":
            self.all_chunks = torch.arange(self.n_chunks, dtype=torch.int32, device=dev)
        self.phases = self._phase_table()

    # -- buffers -----------------------------------------------------------------------------------------------------

    def _selection_buffers(self) -> None:
        """Score rows and the selection, one block of rows per slot (slot-major, so a bucket is a prefix).

        ``scores`` float32 ``[max_batch, n_record(, Hkv_draft), C]``: what the recording layers add; ``score_rows``
        int64 ``[R]``: the rows of ``scores[b].view(-1, C)`` selection gathers (one per sparse layer, or per
        (sparse layer, target KV head)); ``sel_p`` ``[max_batch * R]``; ``idx`` int32 ``[max_batch * R, C]`` /
        ``count`` int32 ``[max_batch * R]``.
        """
        plan, dev, bm, c = self.plan, self.device, self.max_batch, self.n_chunks
        hd = self.pool.kv["draft"][0][0].shape[2] if plan.per_head else None
        heads = () if hd is None else (hd,)
        self.scores = torch.zeros(bm, len(plan.record_layers), *heads, c, dtype=torch.float32, device=dev)
        rows, p = selection_rows(plan, hd)
        self.R = len(rows)
        (self.score_rows, self.sel_p, self.n_valid, self.recent_start, self.idx,
         self.count) = selection_buffers(rows, p, c, dev, bm)
        # sparse drafting: the draft's own rows, p and selection, ``RD`` rows per slot
        drows, dp = draft_selection_rows(plan, hd)
        self.RD = len(drows)
        (self.dscore_rows, self.dsel_p, self.dn_valid, self.drecent_start, self.didx,
         self.dcount) = selection_buffers(drows, dp, c, dev, bm)
        self.draft_kv_read = torch.zeros(bm, len(plan.draft_sparse_layers), dtype=torch.float64, device=dev)

    def _selections(self, b: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per sparse layer, its selection for the first ``b`` slots: ``(idx [b, C], count [b])`` or, per KV head,
        ``(idx [b, Hkv, C], count [b, Hkv])`` (views)."""
        return self._split(self.idx, self.count, self.R, self.plan.sparse_layers, b)

    def _draft_selections(self, b: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per sparse-drafting draft layer, its selection for the first ``b`` slots (as :meth:`_selections`)."""
        return self._split(self.didx, self.dcount, self.RD, self.plan.draft_sparse_layers, b)

    def _split(self, idx, count, rows: int, layers, b: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        n, c = len(layers), self.n_chunks
        idx, count = idx[: b * rows], count[: b * rows]
        if self.plan.per_head:
            idx, count = idx.view(b, n, -1, c), count.view(b, n, -1)
        else:
            idx, count = idx.view(b, n, c), count.view(b, n)
        return {j: (idx[:, r], count[:, r]) for r, j in enumerate(layers)}

    def _layer_counts(self, b: int) -> torch.Tensor:
        """float64 ``[b, n_sparse]``: chunks each sparse layer reads (mean over its KV heads when per head)."""
        return self.count[: b * self.R].view(b, len(self.plan.sparse_layers), -1).double().mean(-1)

    def _rows(self, pos: torch.Tensor, b: int) -> torch.Tensor:
        """Flat pool rows ``[b * T]`` of positions ``pos`` int64 ``[b, T]`` through the first ``b`` page tables."""
        page = self.pool.page_size
        pages = self.page_table[:b].gather(1, pos // page).long()
        return (pages * page + pos % page).reshape(-1)

    def _ring_rows(self, pos: torch.Tensor, b: int) -> torch.Tensor:
        """Flat ring-pool rows ``[b * T]`` of positions ``pos`` int64 ``[b, T]``: slot ``pos % R`` of each ring."""
        page, slot = self.pool.page_size, pos % self.pool.ring_slots
        pages = self.ring_table[:b].gather(1, slot // page).long()
        return (pages * page + slot % page).reshape(-1)

    def _context(self, role: str, pos: torch.Tensor, kv_len: torch.Tensor, b: int, **kw) -> ForwardContext:
        rings = {} if self.ring_table is None else dict(
            ring=self.pool.ring[role], ring_table=self.ring_table[:b], ring_write_pos=self._ring_rows(pos, b))
        return ForwardContext(self.pool.kv[role], self._rows(pos, b), kv_len, self.plan.chunk_size, self.backend,
                              page_table=self.page_table[:b], **rings, **kw)

    def _phase_table(self) -> dict:
        """Phase name -> function of the bucket ``b``, in replay order."""
        if not self.k:
            return {"verify": self._decode}
        if self.mode == "self":  # select last: it needs the accepted length, the next draft its result
            phases = {"draft": self._self_draft, "verify": self._self_verify, "accept": self._accept_phase,
                      "select": self._self_select}
        else:
            phases = {"draft": self._draft, "select": self._select, "verify": self._verify,
                      "accept": self._accept_phase}
        if not self.plan.sparse_layers:
            phases.pop("select")
        return phases

    # -- phases ------------------------------------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, slot: int, b: int) -> torch.Tensor:
        """Next token int64 ``[b, 1]`` from logits ``[b, V]``: argmax, or row ``i``'s draw at ``slot``."""
        if self.sampling == "greedy":
            return logits.argmax(-1, keepdim=True)
        probs = probs_device(logits, self.temperature[:b], self.top_p[:b] if self.sampling == "sample_top_p"
                             else None)
        if self.q_probs is not None and slot < self.k:
            self.q_probs[:b, slot].copy_(probs)
        return sample(probs, self.seed[:b], self.step_no[:b], slot)

    def _draft(self, b: int) -> None:
        k, L, plan = self.k, self.L[:b], self.plan
        self.scores[:b].zero_()
        pos = (L[:, None] + self.offsets - 1).clamp_(min=0)  # [b, k + 1]: L - 1, L, .. L + k - 1 (L = 0: both 0)
        lens = (pos + 1).to(torch.int32)
        rec = self.scores[:b]
        record = {i: rec[:, r] for r, i in enumerate(plan.record_layers)}  # the first forward records every row
        sparse = self._draft_selections(b) if plan.draft_sparse_layers else {}
        guide = {i: record[i] for i in plan.guide_layers} if not sparse or plan.sparse_forwards_guide else {}
        ids, p = torch.cat([self.prev[:b], self.cur[:b]], dim=1), pos[:, :2]
        for s in range(k):
            kv_len = lens[:, s + 1].contiguous()
            ctx = self._context("draft", p, kv_len, b, record=record, record_last_query=True) if s == 0 else \
                self._context("draft", p, kv_len, b, record=guide, sparse=sparse)
            with active(ctx):
                logits = self.forwards["draft"](ids, p)[:, -1]
            self.drafted[:b, s : s + 1].copy_(self._choose(logits, s, b))
            ids, p = self.drafted[:b, s : s + 1], pos[:, s + 2 : s + 3]
            if s == 0 and sparse and k > 1:
                self._draft_select(b)

    def _draft_select(self, b: int) -> None:
        """The draft's own selection from its first forward's rows (see ``DecodeEngine._draft_select``)."""
        c, L, n = self.plan.chunk_size, self.L[:b], b * self.RD
        n_keys = L + self.k
        self.dn_valid[:n].copy_(((n_keys + c - 1) // c)[:, None].expand(b, self.RD).reshape(-1))
        self.drecent_start[:n].copy_(((L - 1).clamp(min=0) // c)[:, None].expand(b, self.RD).reshape(-1))
        rows = self.scores[:b].flatten(1, -2).index_select(1, self.dscore_rows).reshape(n, -1)
        topp_into(rows, self.dsel_p[:n], self.dn_valid[:n], self.drecent_start[:n], self.didx[:n], self.dcount[:n],
                  self.backend)
        counts = self.dcount[:n].view(b, len(self.plan.draft_sparse_layers), -1).double().mean(-1)
        self.draft_kv_read[:b].add_(read_share(counts, n_keys.double()[:, None], c).clamp(max=1.0))

    def _select(self, b: int) -> None:
        c = self.plan.chunk_size  # every chunk holding a verified position is kept
        self._select_top_p(b, self.L[:b] + self.k + 1, self.L[:b] // c)

    def _select_top_p(self, b: int, n_keys: torch.Tensor, recent_start: torch.Tensor) -> None:
        """Top-p over the first ``b`` slots' rows: chunks below ``ceil(n_keys / c)`` (int64 ``[b]``), every chunk
        from ``recent_start`` (``[b]``) on forced."""
        c, n = self.plan.chunk_size, b * self.R
        self.n_valid[:n].copy_(((n_keys + c - 1) // c)[:, None].expand(b, self.R).reshape(-1))
        self.recent_start[:n].copy_(recent_start[:, None].expand(b, self.R).reshape(-1))
        rows = self.scores[:b].flatten(1, -2).index_select(1, self.score_rows).reshape(n, -1)  # [b * R, C]
        topp_into(rows, self.sel_p[:n], self.n_valid[:n], self.recent_start[:n], self.idx[:n], self.count[:n],
                  self.backend)

    def _target_forward(self, b: int, q_len: int, **kw) -> torch.Tensor:
        """The target over ``verify_ids[:b, :q_len]`` at positions ``L .. L + q_len - 1``: logits ``[b, q_len, V]``."""
        pos = self.L[:b, None] + self.offsets[:q_len]
        kv_len = (self.L[:b] + q_len).to(torch.int32)
        with active(self._context("target", pos, kv_len, b, **kw)):
            return self.forwards["target"](self.verify_ids[:b, :q_len], pos)

    def _verify(self, b: int) -> None:
        self.verify_ids[:b, :1].copy_(self.cur[:b])
        self.verify_ids[:b, 1:].copy_(self.drafted[:b, : self.k])
        self.tlogits[:b].copy_(self._target_forward(b, self.k + 1, sparse=self._selections(b)))

    def _accept(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n accepted int64 [b], emitted int64 [b, k + 1])``; benchmarks override it."""
        drafted = self.drafted[:b, : self.k]
        if self.sampling == "greedy":
            return greedy_accept_batch(drafted, self.tlogits[:b])
        top_p = self.top_p[:b, :, None] if self.sampling == "sample_top_p" else None
        p = probs_device(self.tlogits[:b], self.temperature[:b, :, None], top_p)
        return rejection_accept_batch(drafted, self.q_probs[:b], p, self.seed[:b], self.step_no[:b])

    def _accept_phase(self, b: int) -> None:
        if self.plan.sparse_layers and self.mode == "draft":  # share of the visible keys each sparse layer read
            n_keys = (self.L[:b] + self.k + 1).double()[:, None]  # the verification's key count
            self.kv_read[:b].add_(read_share(self._layer_counts(b), n_keys, self.plan.chunk_size))
        n, emitted = self._accept(b)
        self._emit(b, n, emitted)

    def _emit(self, b: int, n: torch.Tensor, emitted: torch.Tensor) -> None:
        self.out[:b, :1].copy_(n[:, None] + 1)
        self.out[:b, 1 : 1 + emitted.shape[1]].copy_(emitted)
        self.prev[:b].copy_(self.verify_ids[:b].gather(1, n[:, None]))  # the token now at position L + n
        self.cur[:b].copy_(emitted.gather(1, n[:, None]))
        self.L[:b].add_(n + 1)  # rollback of both caches: the rejected positions are simply beyond L
        self.step_no[:b].add_(1)

    def _decode(self, b: int) -> None:
        """``k = 0``: one target forward of each slot's last token, one new token each."""
        self.verify_ids[:b, :1].copy_(self.cur[:b])
        logits = self._target_forward(b, 1)[:, -1]
        tok = self._choose(logits, SLOT_FINAL, b)
        self._emit(b, torch.zeros(b, dtype=torch.int64, device=self.device), tok)

    # -- mode "self" -------------------------------------------------------------------------------------------------

    def _self_draft(self, b: int) -> None:
        k, L = self.k, self.L[:b]
        ids, sparse = self.cur[:b], self._selections(b)
        for s in range(k):
            pos = (L + s)[:, None]
            with active(self._context("target", pos, (L + s + 1).to(torch.int32), b, sparse=sparse)):
                logits = self.forwards["target"](ids, pos)[:, -1]
            self.drafted[:b, s : s + 1].copy_(self._choose(logits, s, b))
            ids = self.drafted[:b, s : s + 1]
        if self.plan.sparse_layers:  # share of the last draft forward's keys each sparse layer read
            n_keys = (L + k).double()[:, None]
            self.kv_read[:b].add_(read_share(self._layer_counts(b), n_keys, self.plan.chunk_size).clamp(max=1.0))

    def _self_verify(self, b: int) -> None:
        self.scores[:b].zero_()  # the dense verification adds this round's attention
        self.verify_ids[:b, :1].copy_(self.cur[:b])
        self.verify_ids[:b, 1:].copy_(self.drafted[:b, : self.k])
        rec = self.scores[:b]
        record = {j: rec[:, r] for r, j in enumerate(self.plan.record_layers)}
        self.tlogits[:b].copy_(self._target_forward(b, self.k + 1, record=record))

    def _self_select(self, b: int) -> None:
        # the next round drafts L .. L + k - 1: candidates below ceil((L + k) / c), every chunk from the one
        # holding L - 1 (the newest verified key) on is read
        c, L = self.plan.chunk_size, self.L[:b]
        self._select_top_p(b, L + self.k, (L - 1).clamp(min=0) // c)

    # -- slots -------------------------------------------------------------------------------------------------------

    def load_slot(self, slot: int, pages: list[int], length: int, last_token: int, prev_token: int | None, *,
                  seed: int = 0, temperature: float = 1.0, top_p: float = 1.0, ring_pages: list[int] = ()) -> None:
        """Make ``slot`` decode a sequence whose pages (and ``ring_pages``, where the pool keeps rings) hold
        ``length`` positions, ``last_token`` emitted."""
        if len(pages) > self.max_pages:
            raise ValueError(f"{len(pages)} pages exceed the engine's page table of {self.max_pages}")
        if length > 0 and prev_token is None:
            raise ValueError("prev_token (the token at position length - 1) is needed when length > 0")
        if self.ring_table is not None:
            if len(ring_pages) != self.pool.ring_pages:
                raise ValueError(f"the pool's rings need {self.pool.ring_pages} ring pages, got {len(ring_pages)}")
            self.ring_table[slot].copy_(torch.tensor(ring_pages, dtype=torch.int32))
        row = torch.full((self.max_pages,), SCRATCH_PAGE, dtype=torch.int32)
        row[: len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.page_table[slot].copy_(row)
        self.L[slot] = length
        self.cur[slot] = last_token
        self.prev[slot] = last_token if length == 0 or prev_token is None else prev_token
        self.step_no[slot] = 0
        self.seed[slot] = seed
        self.temperature[slot] = max(float(temperature), 1e-6)
        self.top_p[slot] = float(top_p)
        self.kv_read[slot] = 0
        self.draft_kv_read[slot] = 0
        if self.mode == "self" and self.plan.sparse_layers:  # the first round drafts densely: nothing recorded yet
            r = slice(slot * self.R, (slot + 1) * self.R)
            self.idx[r].copy_(self.all_chunks.expand(self.R, -1))
            self.count[r].fill_(-(-(length + self.k) // self.plan.chunk_size))

    def clear_slot(self, slot: int) -> None:
        """A padded slot: its page tables point at the scratch page, its length at 0."""
        self.page_table[slot].fill_(SCRATCH_PAGE)
        if self.ring_table is not None:
            self.ring_table[slot].fill_(SCRATCH_PAGE)
        self.L[slot] = 0
        self.cur[slot] = 0
        self.prev[slot] = 0

    def move_slot(self, src: int, dst: int) -> None:
        """Move a sequence's device state from slot ``src`` to ``dst`` (to keep the live slots a prefix)."""
        for t in self._slot_tensors():
            t[dst].copy_(t[src])
        for r, ts in ((self.R, (self.idx, self.count, self.n_valid, self.recent_start)),
                      (self.RD, (self.didx, self.dcount, self.dn_valid, self.drecent_start))):
            for t in ts:
                t[dst * r : (dst + 1) * r].copy_(t[src * r : (src + 1) * r])
        self.clear_slot(src)

    def _slot_tensors(self) -> list[torch.Tensor]:
        """A sequence's device state: one row per slot."""
        return [self.L, self.cur, self.prev, self.step_no, self.seed, self.temperature, self.top_p,
                *self.page_tables(), self.kv_read, self.draft_kv_read, self.scores]

    def page_tables(self) -> list[torch.Tensor]:
        """The page table, and the ring-page table where the pool keeps rings."""
        return [self.page_table] + ([self.ring_table] if self.ring_table is not None else [])

    def phase_buffers(self) -> list[torch.Tensor]:
        """Every buffer a phase writes (what warm-up and graph capture must leave as they found them), and the page
        tables (capture points them at the scratch page)."""
        ts = [self.L, self.cur, self.prev, self.step_no, *self.page_tables(), self.kv_read, self.out,
              self.verify_ids, self.drafted, self.scores, self.idx, self.count, self.n_valid, self.recent_start,
              self.draft_kv_read, self.didx, self.dcount, self.dn_valid, self.drecent_start]
        return ts + ([self.q_probs] if self.q_probs is not None else [])

    def kv_read_sum(self, slot: int) -> list[float]:
        """Per sparse layer, the summed fraction of keys slot ``slot`` read (reads the device)."""
        return self.kv_read[slot].tolist()

    def draft_kv_read_sum(self, slot: int) -> list[float]:
        """Per sparse-drafting draft layer, the summed share of keys slot ``slot``'s later draft forwards read."""
        return self.draft_kv_read[slot].tolist()
