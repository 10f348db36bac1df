"""The decode engine: a speculative step as four static-shape phases, captured once as CUDA graphs.

One object owns every buffer a step reads or writes (the sglang / vLLM graph-runner pattern): the current length
``L`` (positions both caches hold), the last emitted token, the drafted tokens, the draft's score rows, the
selection, the target's logits, the emitted tokens. A step is "replay the phases, read the emitted tokens":

1. ``draft``: ``k`` forwards of the draft, the first over ``[previous token, last emitted token]`` at positions
   ``L - 1, L`` (rewriting position ``L - 1`` fills the draft's cache for the last drafted token when the previous
   step accepted all ``k``; otherwise it rewrites the same values), then one token at ``L + 1 .. L + k - 1``; the
   mapped layers add the new query's chunk-pooled attention to the score rows inside the attention kernel. With
   sparse drafting (a plan with ``draft_sparse_layers``), the first forward is dense and records every draft layer
   that drafts sparsely; one top-p launch over those rows (each layer's own p, sink and every chunk from the one
   holding ``L - 1`` kept) picks the chunks the other ``k - 1`` forwards read in those layers: at long context the
   draft's own KV, read ``k`` times a step, is otherwise the largest read of the step;
2. ``select``: one launch of the top-p kernel over the sparse target layers' rows, each with its own p;
3. ``verify``: one ``k + 1``-token forward of the target at the same positions, sparse layers reading only the
   selected chunks;
4. ``accept``: greedy or rejection-sampling acceptance on the device, then ``L += accepted + 1`` (rolling both
   caches back is that length update), the next step's first token, and the packed output.

Selection is per sparse layer (head-averaged draft rows, the paper's form) or, with a plan that has a head map,
per (sparse layer, target KV head): the draft then records one row per (mapped layer, draft KV head), its query
heads averaged, the select phase gathers each target KV head's row from its mapped draft head and runs top-p with
that head's p, and the verification kernel reads one index list per KV head (one program per KV head already:
no extra reads).

Nothing is allocated per step, nothing is read back but the packed output (the one synchronisation of a step),
and CUDA events between the phases time them without adding a synchronisation. ``k = 0`` is plain
autoregressive decoding of the target (one ``decode`` phase). On CPU (and with ``graphs=False``) the same phase
functions run eagerly: that is how CI checks the engine's bookkeeping against the eager runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..rng import SLOT_FINAL, sample
from ..sampling import greedy_accept_device, probs_device, rejection_accept_device
from .forward import ForwardContext, active
from .kv import KVStore

SAMPLING_MODES = ("greedy", "sample", "sample_top_p")


def sampling_mode(temperature: float, top_p: float) -> str:
    """The phases a request needs: greedy (``temperature <= 0``), sampling, or sampling with the nucleus filter
    (whose sort the other graphs leave out)."""
    return "greedy" if temperature <= 0 else ("sample_top_p" if top_p < 1.0 else "sample")


@dataclass(frozen=True)
class SparsePlan:
    """Which target layers verify sparsely, guided by which draft layer, at which top-p.

    With ``head_map`` and ``top_p_head`` (both or neither; one tuple per sparse layer, one entry per target KV head:
    the draft KV head guiding that target KV head, and its p), selection is one chunk set per (sparse layer,
    target KV head) and ``top_p`` is not used; without them, one set per layer from head-averaged draft rows.
    """

    sparse_layers: tuple[int, ...] = ()
    draft_layers: tuple[int, ...] = ()  # guiding draft layer of each sparse layer
    top_p: tuple[float, ...] = ()
    chunk_size: int = 16
    head_map: tuple[tuple[int, ...], ...] = ()  # [n_sparse][target KV heads]: guiding draft KV head
    top_p_head: tuple[tuple[float, ...], ...] = ()  # [n_sparse][target KV heads]: p
    # Sparse drafting: draft layers whose forwards after the step's first read only the chunks that first (dense)
    # forward's attention selects, with their own p (per draft KV head when the plan is per head).
    draft_sparse_layers: tuple[int, ...] = ()
    draft_top_p: tuple[float, ...] = ()
    # With sparse drafting, whether the sparse forwards also add their attention to the guiding rows. Off by
    # default: a sparse forward's mass lies only on the chunks the draft selected (at the draft's p), so summed into
    # the rows it pulls the target's top-p inside the draft's selection; the first forward's dense row does not.
    sparse_forwards_guide: bool = False

    def __post_init__(self):
        if bool(self.head_map) != bool(self.top_p_head):
            raise ValueError("head_map and top_p_head come together (per-KV-head selection): pass both or neither")
        n = len(self.sparse_layers)
        widths = {len(row) for row in self.head_map + self.top_p_head}
        if self.head_map and (len(self.head_map) != n or len(self.top_p_head) != n or len(widths) != 1 or
                              0 in widths):
            raise ValueError(f"head_map and top_p_head need one row per sparse layer ({n}), all of one width (the "
                             f"target's KV heads); got {len(self.head_map)} and {len(self.top_p_head)} rows of "
                             f"widths {sorted(widths)}")
        if len(self.draft_sparse_layers) != len(self.draft_top_p):
            raise ValueError(f"draft_sparse_layers ({len(self.draft_sparse_layers)}) and draft_top_p "
                             f"({len(self.draft_top_p)}) need one entry each")
        if len(set(self.draft_sparse_layers)) != len(self.draft_sparse_layers):
            raise ValueError(f"draft_sparse_layers has repeats: {self.draft_sparse_layers}")

    @property
    def per_head(self) -> bool:
        return bool(self.head_map)

    @property
    def guide_layers(self) -> tuple[int, ...]:
        """Draft layers whose attention guides the target's selection (recorded by every draft forward)."""
        return tuple(sorted(set(self.draft_layers)))

    @property
    def record_layers(self) -> tuple[int, ...]:
        """Draft layers with a score row: the guiding ones and, for sparse drafting, the sparse-drafting ones
        (recorded by the step's first, dense forward only)."""
        return tuple(sorted(set(self.draft_layers) | set(self.draft_sparse_layers)))


def selection_rows(plan: SparsePlan, draft_kv_heads: int | None) -> tuple[list[int], list[float]]:
    """The score rows selection gathers and their p, one per sparse layer or per (sparse layer, target KV head),
    layer-major: indices into the recorded rows viewed as ``[n_record (* Hkv_draft), C]``.

    Per KV head (``draft_kv_heads`` given), the draft records per (mapped draft layer, draft KV head) and selection
    gathers the (sparse layer, target KV head) rows from those: a draft layer may guide several target layers and a
    draft head several target heads, so recording per target pair would write those rows again in each of the k
    draft forwards (inside the attention kernel), where the gather copies each row once per step.
    """
    rec = plan.record_layers
    if draft_kv_heads is None:
        return [rec.index(i) for i in plan.draft_layers], list(plan.top_p)
    rows = [rec.index(i) * draft_kv_heads + h for i, heads in zip(plan.draft_layers, plan.head_map) for h in heads]
    return rows, [x for ps in plan.top_p_head for x in ps]


def draft_selection_rows(plan: SparsePlan, draft_kv_heads: int | None) -> tuple[list[int], list[float]]:
    """Sparse drafting's score rows and their p: one per sparse-drafting draft layer, or per (layer, draft KV head)
    when ``draft_kv_heads`` is given (a per-head plan), indices into the recorded rows as in :func:`selection_rows`."""
    rec = plan.record_layers
    if draft_kv_heads is None:
        return [rec.index(i) for i in plan.draft_sparse_layers], list(plan.draft_top_p)
    rows = [rec.index(i) * draft_kv_heads + h for i in plan.draft_sparse_layers for h in range(draft_kv_heads)]
    return rows, [p for p in plan.draft_top_p for _ in range(draft_kv_heads)]


def selection_buffers(rows: list[int], p: list[float], n_chunks: int, device, slots: int = 1) -> tuple:
    """The device state of one select phase for ``slots`` sequences (slot-major): ``score_rows`` int64 ``[R]``,
    ``sel_p`` float32 ``[slots * R]``, then int32 ``n_valid`` / ``recent_start`` ``[slots * R]``, ``idx``
    ``[slots * R, C]`` and ``count`` ``[slots * R]``."""
    n, i32 = slots * len(rows), dict(dtype=torch.int32, device=device)
    return (torch.tensor(rows, dtype=torch.int64, device=device),
            torch.tensor(p, dtype=torch.float32, device=device).repeat(slots), torch.zeros(n, **i32),
            torch.zeros(n, **i32), torch.zeros(n, n_chunks, **i32), torch.zeros(n, **i32))


def topp_into(rows: torch.Tensor, p: torch.Tensor, n_valid: torch.Tensor, recent_start: torch.Tensor,
              idx: torch.Tensor, count: torch.Tensor, backend: str) -> None:
    """Top-p over score ``rows`` ``[R, C]`` into ``idx`` ``[R, C]`` / ``count`` ``[R]`` (static shapes: the engines'
    select phases): chunks below ``n_valid``, the sink and every chunk from ``recent_start`` on kept."""
    if backend == "triton":
        from ..selection.triton_select import topp_select_triton

        topp_select_triton(rows, p, n_valid, recent_start=recent_start, out_idx=idx, out_count=count)
    else:
        from ..selection.threshold import topp_mask_threshold
        from ..sparse.triton_attn import mask_to_indices

        mask = topp_mask_threshold(rows, p, n_valid, recent_start=recent_start)
        i, n = mask_to_indices(mask)
        idx.copy_(i)
        count.copy_(n)


def read_share(chunks: torch.Tensor, n_keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """float64: the share of ``n_keys`` visible keys that reading ``chunks`` chunks reads (the newest chunk's
    padding past the last key is not a read)."""
    pad = torch.ceil(n_keys / chunk_size) * chunk_size - n_keys
    return (chunks * chunk_size - pad) / n_keys


@dataclass
class StepTimes:
    """Seconds per phase, summed over steps (from CUDA events on the GPU, host clock on the CPU)."""

    draft: float = 0.0
    select: float = 0.0
    verify: float = 0.0
    accept: float = 0.0


class DecodeEngine:
    """Static-shape speculative (``k >= 1``) or autoregressive (``k = 0``) decoding over a :class:`KVStore`.

    Parameters
    ----------
    target : torch.nn.Module
        The target model (its config gives the vocabulary size; the forwards below call the models).
    store : KVStore
        Caches with roles ``"target"`` (and ``"draft"``).
    plan : SparsePlan
        Sparse verification layers; empty = dense verification.
    forwards : dict
        role -> ``forward(ids [1, Tq], positions [1, Tq]) -> logits [1, Tq, V]`` (see ``forward.make_forward``).
    sampling : str
        ``"greedy"``, ``"sample"`` or ``"sample_top_p"`` (temperature / top-p values are device buffers, set per
        call by :meth:`start`; the nucleus filter's sort is left out of the graphs that do not need it).
    backend : str
        ``"triton"`` (kernels) or ``"torch"`` (the static-shape reference) for attention and selection.
    graphs : bool
        Capture each phase as a CUDA graph (CUDA only).
    """

    def __init__(self, target, store: KVStore, plan: SparsePlan, k: int, forwards: dict, *,
                 sampling: str = "greedy", backend: str = "triton", graphs: bool = False):
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if store.has_rings and k + 1 > store.max_forward_tokens:  # the rings are sized for that many (ring.py)
            raise ValueError(f"k = {k}: a verification writes k + 1 tokens, more than the {store.max_forward_tokens} "
                             "the store's window-layer rings keep room for (KVStore(max_forward_tokens=...))")
        self.target, self.store, self.plan, self.k = target, store, plan, k
        self.forwards, self.sampling, self.backend = forwards, sampling, backend
        dev = store.device
        self.device = dev
        self.graphs_enabled = graphs and dev.type == "cuda"
        c = plan.chunk_size
        n_chunks = -(-store.capacity // c)
        vocab = target.config.get_text_config().vocab_size if hasattr(target.config, "get_text_config") \
            else target.config.vocab_size
        i64 = dict(dtype=torch.int64, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        # -- state carried from step to step
        self.L = torch.zeros(1, **i64)  # positions both caches hold (the last emitted token is not among them)
        self.cur = torch.zeros(1, 1, **i64)  # last emitted token: the first query of the next step
        self.prev = torch.zeros(1, 1, **i64)  # the token at position L - 1 (or cur when L = 0)
        self.step_no = torch.zeros(1, **i64)  # counter of the random draws
        self.seed = torch.zeros(1, **i64)
        self.temperature = torch.ones(1, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(1, dtype=torch.float32, device=dev)
        self.offsets = torch.arange(k + 1, **i64)
        # -- per-step buffers
        self.out = torch.zeros(k + 2, **i64)  # [tokens emitted, tokens...]: the one thing read back per step
        self.host_out = torch.zeros(k + 2, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.verify_ids = torch.zeros(1, k + 1, **i64)
        self.verify_pos = torch.zeros(k + 1, **i64)
        self.verify_len = torch.zeros(1, **i32)
        self.tlogits = None  # [k + 1, V], allocated by the first verify (model dtype)
        self.drafted = torch.zeros(k + 1, **i64)  # k drafted tokens (+ one spare slot)
        self.draft_ids0 = torch.zeros(1, 2, **i64)  # first draft forward: [prev, cur]
        self.draft_pos = torch.zeros(k + 1, **i64)  # L - 1, L, ..., L + k - 1 (the first clamped at 0)
        self.draft_lens = torch.zeros(k + 1, **i32)
        self.q_probs = torch.zeros(k + 1, vocab, dtype=torch.float32, device=dev) if sampling != "greedy" and k \
            else None  # the last row stays 0: the bonus position has no draft distribution
        ns = len(plan.sparse_layers)
        self._selection_buffers(n_chunks)
        self.kv_read = torch.zeros(ns, dtype=torch.float64, device=dev)  # summed fraction of keys read, per layer
        # -- what each forward's attention reads
        kv_t = store.kv["target"]
        self.verify_ctx = ForwardContext(kv_t, self.verify_pos, self.verify_len, c, backend,
                                         sparse={j: self._layer_selection(r) for r, j in enumerate(plan.sparse_layers)},
                                         ring=store.ring["target"])
        self.draft_ctx = self._draft_contexts() if k else []
        self.phases = self._phase_table()
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self.times = StepTimes()
        if self.graphs_enabled:
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(len(self.phases) + 1)]
            self._done = torch.cuda.Event()

    def _selection_buffers(self, n_chunks: int) -> None:
        """The draft's score rows, the select phase's rows and p, and the selection it writes.

        ``scores`` float32 ``[n_record, C]`` (head-averaged) or ``[n_record, Hkv_draft, C]`` (per KV head): what the
        mapped draft layers record; ``score_rows`` int64 ``[R]``: the rows of ``scores.view(-1, C)`` the select
        phase gathers, one per sparse layer or per (sparse layer, target KV head), layer-major; ``sel_p`` float32
        ``[R]``; ``idx`` int32 ``[R, C]`` / ``count`` int32 ``[R]``: the selection.
        """
        plan, dev = self.plan, self.device
        n_rec = len(plan.record_layers)
        if plan.per_head:
            hd = self._draft_kv_heads()
            self.scores = torch.zeros(n_rec, hd, n_chunks, dtype=torch.float32, device=dev)
        else:
            hd = None
            self.scores = torch.zeros(n_rec, n_chunks, dtype=torch.float32, device=dev)
        (self.score_rows, self.sel_p, self.n_valid, self.recent_start, self.idx,
         self.count) = selection_buffers(*selection_rows(plan, hd), n_chunks, dev)
        # sparse drafting: the same buffers for the draft's own selection (``d`` prefix)
        (self.dscore_rows, self.dsel_p, self.dn_valid, self.drecent_start, self.didx,
         self.dcount) = selection_buffers(*draft_selection_rows(plan, hd), n_chunks, dev)
        self.draft_kv_read = torch.zeros(len(plan.draft_sparse_layers), dtype=torch.float64, device=dev)

    def _draft_kv_heads(self) -> int:
        """The draft's KV heads, checked against the plan's head map (and the target's KV heads against its width)."""
        if "draft" not in self.store.kv:
            raise ValueError("a per-KV-head plan needs the draft's caches (a KVStore with role 'draft')")
        hd = self.store.kv["draft"][0][0].shape[1]
        ht = self.store.kv["target"][0][0].shape[1]
        if len(self.plan.head_map[0]) != ht:
            raise ValueError(f"the plan's head_map has {len(self.plan.head_map[0])} entries per layer; the target has "
                             f"{ht} KV heads")
        if max(max(heads) for heads in self.plan.head_map) >= hd or min(min(h) for h in self.plan.head_map) < 0:
            raise ValueError(f"the plan's head_map names draft KV heads outside [0, {hd})")
        return hd

    def _layer_selection(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse layer ``r``'s selection as its attention reads it: ``(idx [1, C], count [1])``, or per KV head
        ``(idx [1, Hkv, C], count [1, Hkv])`` (views of ``idx`` / ``count``)."""
        if not self.plan.per_head:
            return self.idx[r : r + 1], self.count[r : r + 1]
        ns, c = len(self.plan.sparse_layers), self.idx.shape[1]
        return self.idx.view(ns, -1, c)[r : r + 1], self.count.view(ns, -1)[r : r + 1]

    def _layer_counts(self) -> torch.Tensor:
        """float64 ``[n_sparse]``: chunks each sparse layer reads (the mean over its KV heads when per head)."""
        return self.count.view(len(self.plan.sparse_layers), -1).double().mean(-1)

    def _draft_selection(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse-drafting layer ``r``'s selection as the draft's attention reads it (views of ``didx`` / ``dcount``:
        ``[1, C]`` / ``[1]``, or ``[1, Hkv_draft, C]`` / ``[1, Hkv_draft]`` per KV head)."""
        if not self.plan.per_head:
            return self.didx[r : r + 1], self.dcount[r : r + 1]
        nd, c = len(self.plan.draft_sparse_layers), self.didx.shape[1]
        return self.didx.view(nd, -1, c)[r : r + 1], self.dcount.view(nd, -1)[r : r + 1]

    def _draft_contexts(self) -> list[ForwardContext]:
        """What each of the ``k`` draft forwards' attention reads and records (subclasses draft differently).

        The first forward records every row (the guiding layers' and the sparse-drafting layers'); the others
        record the guiding layers' only and, with sparse drafting, read the draft selection in those layers (and
        record nothing unless ``plan.sparse_forwards_guide``)."""
        c, backend, plan = self.plan.chunk_size, self.backend, self.plan
        kv_d = self.store.kv["draft"]
        rows = {i: self.scores[r : r + 1] for r, i in enumerate(plan.record_layers)}
        sparse = {i: self._draft_selection(r) for r, i in enumerate(plan.draft_sparse_layers)}
        guide = {i: rows[i] for i in plan.guide_layers} if not sparse or plan.sparse_forwards_guide else {}
        ring = self.store.ring["draft"]
        ctx = [ForwardContext(kv_d, self.draft_pos[0:2], self.draft_lens[1:2], c, backend, record=rows,
                              record_last_query=True, ring=ring)]
        return ctx + [ForwardContext(kv_d, self.draft_pos[s + 1 : s + 2], self.draft_lens[s + 1 : s + 2], c, backend,
                                     sparse=sparse, record=guide, ring=ring) for s in range(1, self.k)]

    def _phase_table(self) -> dict:
        """Phase name -> function, in replay order."""
        if not self.k:
            return {"verify": self._decode}
        phases = {"draft": self._draft, "select": self._select, "verify": self._verify, "accept": self._accept_phase}
        if not self.plan.sparse_layers:
            phases.pop("select")
        return phases

    # -- phases (each a static-shape function of the buffers above) --------------------------------------------

    def _choose(self, logits: torch.Tensor, slot: int) -> torch.Tensor:
        """Next token int64 ``[1]`` from logits ``[V]``: argmax, or a draw at ``slot`` of this step."""
        if self.sampling == "greedy":
            return logits.argmax(-1, keepdim=True)
        probs = probs_device(logits, self.temperature, self.top_p if self.sampling == "sample_top_p" else None)
        if self.q_probs is not None and slot < self.k:
            self.q_probs[slot].copy_(probs)
        return sample(probs, self.seed, self.step_no, slot)

    def _draft(self) -> None:
        self.scores.zero_()
        torch.add(self.L, self.offsets - 1, out=self.draft_pos)
        self.draft_pos.clamp_(min=0)  # L = 0 (one-token prompt): the first forward's two rows are cur at 0
        self.draft_lens.copy_(self.draft_pos + 1)
        self.draft_ids0[:, :1].copy_(self.prev)
        self.draft_ids0[:, 1:].copy_(self.cur)
        ids, pos = self.draft_ids0, self.draft_pos[0:2].view(1, 2)
        for s in range(self.k):
            with active(self.draft_ctx[s]):
                logits = self.forwards["draft"](ids, pos)[0, -1]
            self.drafted[s : s + 1].copy_(self._choose(logits, s))
            ids, pos = self.drafted[s : s + 1].view(1, 1), self.draft_pos[s + 2 : s + 3].view(-1, 1)
            if s == 0 and self.plan.draft_sparse_layers and self.k > 1:
                self._draft_select()

    def _draft_select(self) -> None:
        """The draft's own selection from its first forward's rows: the later drafts (positions up to ``L + k -
        1``) read chunks below ``ceil((L + k) / c)``, every chunk from the one holding ``L - 1`` on kept."""
        c, k = self.plan.chunk_size, self.k
        n_keys, recent = self.L + k, (self.L - 1).clamp(min=0) // c
        self.dn_valid.copy_(((n_keys + c - 1) // c).expand_as(self.dn_valid))
        self.drecent_start.copy_(recent.expand_as(self.drecent_start))
        rows = self.scores.view(-1, self.scores.shape[-1]).index_select(0, self.dscore_rows)
        topp_into(rows, self.dsel_p, self.dn_valid, self.drecent_start, self.didx, self.dcount, self.backend)
        counts = self.dcount.view(len(self.plan.draft_sparse_layers), -1).double().mean(-1)
        # share of the last draft forward's keys each sparse-drafting layer read (k - 1 of the k forwards)
        self.draft_kv_read.add_(read_share(counts, n_keys.double(), c).clamp(max=1.0))

    def _select(self) -> None:
        c = self.plan.chunk_size  # every chunk holding a verified position is kept
        self._select_top_p(self.L + self.k + 1, self.L // c)

    def _select_top_p(self, n_keys: torch.Tensor, recent_start: torch.Tensor) -> None:
        """Top-p over the score rows into ``idx`` / ``count``: chunks below ``ceil(n_keys / c)``, every chunk from
        ``recent_start`` on forced (both int64 ``[1]`` device tensors)."""
        c = self.plan.chunk_size
        self.n_valid.copy_(((n_keys + c - 1) // c).expand_as(self.n_valid))
        self.recent_start.copy_(recent_start.expand_as(self.recent_start))
        rows = self.scores.view(-1, self.scores.shape[-1]).index_select(0, self.score_rows)  # [R, C]
        topp_into(rows, self.sel_p, self.n_valid, self.recent_start, self.idx, self.count, self.backend)

    def _target_forward(self, q_len: int) -> torch.Tensor:
        torch.add(self.L, self.offsets[:q_len], out=self.verify_pos[:q_len])
        self.verify_len.copy_(self.L + q_len)
        with active(self.verify_ctx):
            return self.forwards["target"](self.verify_ids[:, :q_len], self.verify_pos[:q_len].view(1, -1))[0]

    def _verify(self) -> None:
        self.verify_ids[:, :1].copy_(self.cur)
        self.verify_ids[0, 1:].copy_(self.drafted[: self.k])
        logits = self._target_forward(self.k + 1)
        if self.tlogits is None:
            self.tlogits = torch.empty_like(logits)
        self.tlogits.copy_(logits)

    def _accept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n accepted int64 [1], emitted int64 [k + 1])`` from the buffers; benchmarks override it."""
        drafted = self.drafted[: self.k]
        if self.sampling == "greedy":
            return greedy_accept_device(drafted, self.tlogits)
        p = probs_device(self.tlogits, self.temperature, self.top_p if self.sampling == "sample_top_p" else None)
        return rejection_accept_device(drafted, self.q_probs, p, self.seed, self.step_no)

    def _accept_phase(self) -> None:
        n, emitted = self._accept()
        self._emit(n, emitted)
        if self.plan.sparse_layers:  # fraction of the visible keys each sparse layer read (the newest chunk's
            c = self.plan.chunk_size  # padding past the last key is not a read)
            self.kv_read.add_(read_share(self._layer_counts(), self.verify_len.double(), c))

    def _emit(self, n: torch.Tensor, emitted: torch.Tensor) -> None:
        self.out[:1].copy_(n + 1)
        self.out[1 : 1 + emitted.numel()].copy_(emitted)
        self.prev.view(1).copy_(self.verify_ids[0].index_select(0, n))  # the token now at position L + n
        self.cur.view(1).copy_(emitted.index_select(0, n))
        self.L.add_(n + 1)  # rollback of both caches: the rejected positions are simply beyond L
        self.step_no.add_(1)

    def _decode(self) -> None:
        """``k = 0``: one target forward of the last token, one new token."""
        self.verify_ids[:, :1].copy_(self.cur)
        logits = self._target_forward(1)[-1]
        tok = self._choose(logits, SLOT_FINAL)
        self._emit(torch.zeros(1, dtype=torch.int64, device=self.device), tok)

    # -- running ---------------------------------------------------------------------------------------------------

    def capture(self) -> float:
        """Warm up (compilation, kernel JIT) and capture every phase as a CUDA graph; returns the seconds spent.

        Call before :meth:`start`: warming up runs the phases and moves the state.
        """
        if not self.graphs_enabled or self.graphs:
            return 0.0
        t0 = time.perf_counter()
        # warm up at the end of the caches, and forget any cached prompt prefix reaching there (the warm-up
        # overwrites those positions)
        first = self.store.capacity - 2 * (self.k + 2)
        self.L.fill_(first)
        self.store.invalidate_from(first)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # the first run compiles; the second runs what will be captured
                for phase in self.phases.values():
                    phase()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for name, phase in self.phases.items():
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    phase()
                self.graphs[name] = g
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        return self.capture_seconds

    def start(self, length: int, last_token: int, prev_token: int | None = None, *, seed: int = 0,
              temperature: float = 1.0, top_p: float = 1.0) -> None:
        """Begin decoding after ``length`` cached positions (``prev_token`` the one at ``length - 1``), with
        ``last_token`` emitted but not yet cached."""
        if length + self.k + 1 > self.store.capacity:
            raise ValueError(f"{length} cached positions + k + 1 exceed the capacity {self.store.capacity}")
        if length > 0 and prev_token is None:
            raise ValueError("prev_token (the token at position length - 1) is needed when length > 0")
        self.L.fill_(length)
        self.cur.fill_(last_token)
        self.prev.fill_(last_token if length == 0 else prev_token)
        self.step_no.zero_()
        self.seed.fill_(seed)
        self.temperature.fill_(temperature)
        self.top_p.fill_(top_p)
        self.kv_read.zero_()
        self.draft_kv_read.zero_()
        self.times = StepTimes()

    @torch.no_grad()
    def step(self) -> list[int]:
        """Run one step; returns the emitted tokens (1 to ``k + 1``). The only host synchronisation of a step."""
        if self.graphs_enabled:
            ev = self._events
            ev[0].record()
            for i, g in enumerate(self.graphs.values()):
                g.replay()
                ev[i + 1].record()
            self.host_out.copy_(self.out, non_blocking=True)
            self._done.record()
            self._done.synchronize()
            for i, name in enumerate(self.graphs):  # complete events: reading them does not synchronise
                setattr(self.times, name, getattr(self.times, name) + ev[i].elapsed_time(ev[i + 1]) / 1e3)
            out = self.host_out.tolist()
        else:
            for name, phase in self.phases.items():
                t0 = time.perf_counter()
                phase()
                setattr(self.times, name, getattr(self.times, name) + time.perf_counter() - t0)
            out = self.out.tolist()
        return out[1 : 1 + out[0]]

    def kv_read_sum(self) -> list[float]:
        """Per sparse layer, the fraction of keys its verification read (the mean over its KV heads when selecting per
        head), summed over steps (reads the device)."""
        return self.kv_read.tolist()

    def draft_kv_read_sum(self) -> list[float]:
        """Per sparse-drafting draft layer, the fraction of keys its sparse forwards read, summed over steps."""
        return self.draft_kv_read.tolist()
