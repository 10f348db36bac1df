"""``SpecAttnRuntime``: speculative decoding whose verification reads only the KV chunks the draft points at.

One step (batch 1):

1. draft ``k + 1`` single-token forwards from the last emitted token (dense attention); the mapped draft layers
   record their chunk-pooled attention rows (the ``k + 1``-th forward only fills the cache and its row);
2. per sparse target layer, the rows of its draft layer are summed and top-p selected (sink chunk and every chunk
   holding a verified position always kept): one chunk set per layer, shared by all ``k + 1`` verified queries;
3. the target verifies the ``k + 1`` positions in one forward, sparse layers through the block-sparse backend;
4. greedy or rejection-sampling acceptance; both caches are cropped back to the accepted prefix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hooks
from .artifact import Artifact, load_artifact
from .cache import preallocated_cache
from .fingerprint import config_hash, tokenizer_hash, weights_hash
from .models import check_model_dir, load_causal_lm, load_tokenizer
from .sampling import greedy_accept, logits_to_probs, speculative_accept
from .selection import select_chunks


@dataclass
class GenerationStats:
    steps: int = 0  # target verification passes
    drafted: int = 0
    accepted: int = 0  # drafted tokens the target accepted
    kv_read_sum: list[float] = field(default_factory=list)  # per target layer, summed over steps
    time_draft: float = 0.0
    time_select: float = 0.0
    time_verify: float = 0.0
    time_prefill: float = 0.0
    time_total: float = 0.0
    new_tokens: int = 0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification pass (accepted drafts + the target's own token)."""
        return (self.accepted + self.steps) / max(self.steps, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def kv_read_fraction(self) -> list[float]:
        """Per target layer: mean fraction of the KV rows its verification attention read."""
        return [s / max(self.steps, 1) for s in self.kv_read_sum]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.time_total, 1e-9)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after the prompt is prefilled (what long-context decoding speed means)."""
        return self.new_tokens / max(self.time_total - self.time_prefill, 1e-9)

    def summary(self) -> dict:
        kv = self.kv_read_fraction
        return {"new_tokens": self.new_tokens, "steps": self.steps, "mean_accepted_length": self.mean_accepted_length,
                "acceptance_rate": self.acceptance_rate, "kv_read_mean": sum(kv) / max(len(kv), 1),
                "tokens_per_second": self.tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second, "time_prefill": self.time_prefill,
                "time_draft": self.time_draft,
                "time_select": self.time_select, "time_verify": self.time_verify,
                "time_other": self.time_total - self.time_prefill - self.time_draft - self.time_select
                - self.time_verify}


@dataclass
class GenerationOutput:
    tokens: list[int]  # new tokens only
    stats: GenerationStats


def check_against_models(art: Artifact, draft_dir: Path, target_dir: Path, n_draft: int, n_target: int,
                         allow_mismatch: bool) -> None:
    """Layer counts always; config/weights/tokenizer hashes unless ``allow_mismatch``. Errors name both sides."""
    if art.n_target_layers != n_target:
        raise ValueError(f"artifact is for a target with {art.n_target_layers} layers; {target_dir} has {n_target}")
    if art.n_draft_layers != n_draft:
        raise ValueError(f"artifact is for a draft with {art.n_draft_layers} layers; {draft_dir} has {n_draft}")
    if allow_mismatch:
        return
    checks = [("target_model", "config_hash", config_hash(target_dir)),
              ("draft_model", "config_hash", config_hash(draft_dir)),
              ("target_model", "weights_hash", weights_hash(target_dir)),
              ("draft_model", "weights_hash", weights_hash(draft_dir))]
    for field_, key, have in checks:
        want = art.info(field_)[key]
        if want != have:
            model = target_dir if field_ == "target_model" else draft_dir
            raise ValueError(f"artifact {field_}.{key} is {want[:16]}... but {model} has {have[:16]}...: it was "
                             "calibrated on other weights; recalibrate, or pass allow_mismatch=True to use it anyway")
    tok = tokenizer_hash(target_dir)
    if art.metadata["tokenizer_hash"] != tok:
        raise ValueError(f"artifact tokenizer_hash {art.metadata['tokenizer_hash'][:16]}... differs from "
                         f"{target_dir}'s {tok[:16]}...")


class SpecAttnRuntime:
    """Sparse speculative generation driven by a calibration artifact. Build with :meth:`from_artifact`."""

    def __init__(self, artifact: Artifact, draft, target, tokenizer=None, *, backend: str = "auto",
                 selection: str = "auto", exact_dense_shortcut: bool = True):
        self.artifact, self.draft, self.target, self.tokenizer = artifact, draft, target, tokenizer
        on_cuda = next(target.parameters()).is_cuda
        if selection == "auto":  # the Triton kernel where it compiles, the same search in torch elsewhere
            selection = "triton" if on_cuda else "threshold"
        if backend == "auto":
            backend = "triton" if on_cuda else "torch"
        self.backend, self.selection = backend, selection
        self.chunk_size = artifact.chunk_size
        self.layer_map = artifact.layer_map.tolist()
        self.top_p = artifact.top_p.tolist()
        # Layers with p >= 1 read everything: keep them on the dense path (exact and cheaper). Turning the shortcut
        # off routes them through selection and the sparse backend, which must then reproduce dense decoding.
        self.sparse_layers = [j for j, (i, p) in enumerate(zip(self.layer_map, self.top_p))
                              if i >= 0 and (p < 1.0 or not exact_dense_shortcut)]
        self.record_layers = frozenset(self.layer_map[j] for j in self.sparse_layers)
        self._sparse_p = torch.tensor([self.top_p[j] for j in self.sparse_layers])
        # GPU work is asynchronous: the time split is only honest if each phase has finished when it is read.
        self._sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    @classmethod
    def from_artifact(cls, path: str | Path, *, draft: str | Path, target: str | Path, device: str = "cpu",
                      dtype: torch.dtype = torch.float32, backend: str = "auto", selection: str = "auto",
                      allow_mismatch: bool = False, **kwargs) -> "SpecAttnRuntime":
        """Load the artifact and both models, refusing models the artifact was not calibrated for.

        Parameters
        ----------
        path : str or Path
            Artifact ``.safetensors`` (e.g. ``artifacts/quick/latest.safetensors``).
        draft, target : str or Path
            Local model directories.
        allow_mismatch : bool
            Accept differing config/weight/tokenizer hashes (layer counts must still match).
        """
        art = load_artifact(path)
        d, t = check_model_dir(draft, "draft"), check_model_dir(target, "target")
        name = hooks.register()
        draft_model = load_causal_lm(d, role="draft", dtype=dtype, device=device, attn_implementation=name)
        target_model = load_causal_lm(t, role="target", dtype=dtype, device=device, attn_implementation=name)
        check_against_models(art, d, t, draft_model.config.num_hidden_layers, target_model.config.num_hidden_layers,
                             allow_mismatch)
        return cls(art, draft_model, target_model, load_tokenizer(t, "target"), backend=backend, selection=selection,
                   **kwargs)

    # -- one speculative step, in small pieces -------------------------------------------------------------------

    def _select(self, rows: dict[int, list[torch.Tensor]], n_keys: int, n_verify: int):
        """Chunk selection per sparse target layer for verifying the last ``n_verify`` of ``n_keys`` positions.

        Returns ``({target layer: selection}, counts)``: a selection is the Triton kernel's compacted
        ``(idx [1, C], count [1])`` or, for the torch methods, a bool mask ``[1, C]``; ``sparse_attention`` takes
        either form. ``counts`` int ``[n_sparse]`` stays on device.
        """
        c = -(-n_keys // self.chunk_size)
        scores = {}
        for i, rs in rows.items():  # sum of the k + 1 draft rows, each padded to the full chunk count
            acc = torch.zeros(rs[0].shape[0], c, device=rs[0].device)
            for r in rs:
                acc[:, : r.shape[1]] += r
            scores[i] = acc
        s = torch.cat([scores[self.layer_map[j]] for j in self.sparse_layers])  # [n_sparse, C]
        p = self._sparse_p.to(s.device)
        recent = c - (n_keys - n_verify) // self.chunk_size  # every verified position's chunk stays
        if self.selection == "triton":
            from .selection.triton_select import topp_select_triton

            n_valid = torch.full((s.shape[0],), c, dtype=torch.int32, device=s.device)
            idx, count = topp_select_triton(s, p, n_valid, keep_recent=recent)
            return {j: (idx[r : r + 1], count[r : r + 1]) for r, j in enumerate(self.sparse_layers)}, count
        mask = select_chunks(s, p, method=self.selection, keep_recent=recent)
        return {j: mask[r : r + 1] for r, j in enumerate(self.sparse_layers)}, mask.sum(-1)

    def _accept(self, drafted: torch.Tensor, q_probs: list[torch.Tensor], tlogits: torch.Tensor,
                temperature: float, top_p: float, gen) -> tuple[int, int]:
        """``(accepted drafts, next token)``: greedy, or rejection sampling when ``temperature > 0``.

        Benchmarks with random weights override this to force an acceptance length (``bench/e2e.py``).
        """
        if temperature > 0:
            return speculative_accept(drafted, torch.stack(q_probs), logits_to_probs(tlogits, temperature, top_p), gen)
        return greedy_accept(drafted, tlogits)

    def generate(self, prompt_ids, max_new_tokens: int = 256, *, k: int = 6, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | None = None, seed: int | None = None,
                 on_tokens=None) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` tokens after ``prompt_ids``.

        Parameters
        ----------
        prompt_ids : sequence of int or torch.Tensor
            ``[n]`` or ``[1, n]`` token ids, ``n >= 1``.
        k : int
            Drafted tokens per verification.
        temperature, top_p : float
            ``temperature == 0``: greedy; otherwise sampling with nucleus ``top_p`` through rejection sampling.
        eos_token_id : int, optional
            Defaults to the tokenizer's; generation stops after emitting it.
        on_tokens : callable, optional
            Called with each step's list of new tokens (for streaming).

        On CUDA the dense layers' SDPA runs without the cuDNN backend, scoped to this call: cuDNN builds a new
        plan for every KV length, ~1.4 ms of host time per layer and step on an H100 (bench/RESULTS.md).
        """
        args = (prompt_ids, max_new_tokens, k, temperature, top_p, eos_token_id, seed, on_tokens)
        if not next(self.target.parameters()).is_cuda:
            return self._generate(*args)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return self._generate(*args)

    @torch.no_grad()
    def _generate(self, prompt_ids, max_new_tokens, k, temperature, top_p, eos_token_id, seed,
                  on_tokens) -> GenerationOutput:
        dev = next(self.target.parameters()).device
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=dev).reshape(1, -1)
        n = ids.shape[1]
        if n == 0:
            raise ValueError("prompt_ids is empty; give at least one token")
        if k < 1 or max_new_tokens < 1:
            raise ValueError(f"k and max_new_tokens must be >= 1, got k={k}, max_new_tokens={max_new_tokens}")
        limit = min(self.target.config.max_position_embeddings, self.draft.config.max_position_embeddings)
        if n + max_new_tokens + k + 1 > limit:
            raise ValueError(f"prompt of {n} tokens + max_new_tokens={max_new_tokens} + k={k} exceeds the models' "
                             f"context of {limit} tokens; shorten the prompt or generate fewer tokens")
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        stats = GenerationStats()
        kv_read = torch.zeros(len(self.sparse_layers), dtype=torch.float64, device=dev)  # summed on device: no sync
        t_start = time.perf_counter()

        capacity = n + max_new_tokens + k + 1  # written in place: no per-step copy of the whole cache
        dcache = preallocated_cache(self.draft.config.num_hidden_layers, capacity)
        tcache = preallocated_cache(self.target.config.num_hidden_layers, capacity)
        if n > 1:  # prefill everything but the last token, densely; it is fed as the first query of step 1
            self.draft(ids[:, :-1], past_key_values=dcache, use_cache=True, logits_to_keep=1)
            self.target(ids[:, :-1], past_key_values=tcache, use_cache=True, logits_to_keep=1)
        self._sync()
        stats.time_prefill = time.perf_counter() - t_start
        cur = ids[:, -1:]
        out: list[int] = []
        while len(out) < max_new_tokens:
            # 1. draft k tokens (+ one forward that only fills the cache and records the last row)
            self._sync()
            t0 = time.perf_counter()
            dstate = hooks.StepState("draft", self.chunk_size, record_layers=self.record_layers)
            drafted, q_probs, tok = [], [], cur
            for s in range(k + 1):
                logits = self.draft(tok, past_key_values=dcache, use_cache=True, specattn_state=dstate).logits[0, -1]
                if s == k:
                    break
                if temperature > 0:
                    q = logits_to_probs(logits, temperature, top_p)
                    q_probs.append(q)
                    nxt = torch.multinomial(q, 1, generator=gen)
                else:
                    nxt = logits.argmax(-1, keepdim=True)
                drafted.append(nxt)
                tok = nxt.view(1, 1)
            drafted_t = torch.cat(drafted)  # [k]
            self._sync()
            t1 = time.perf_counter()
            # 2. select chunks per sparse target layer
            n_keys = n + k  # keys the verification sees: the cache (n - 1) + cur + k drafted
            masks, counts = self._select(dstate.rows, n_keys, k + 1) if self.sparse_layers else ({}, None)
            self._sync()
            t2 = time.perf_counter()
            # 3. verify k + 1 positions
            vstate = hooks.StepState("verify", self.chunk_size, chunk_masks=masks, backend=self.backend)
            block = torch.cat([cur.view(1), drafted_t]).view(1, -1)
            tlogits = self.target(block, past_key_values=tcache, use_cache=True, specattn_state=vstate).logits[0]
            self._sync()
            t3 = time.perf_counter()
            # 4. accept, then roll both caches back to the accepted prefix
            n_acc, nxt = self._accept(drafted_t, q_probs, tlogits, temperature, top_p, gen)
            new = drafted_t[:n_acc].tolist() + [nxt]
            if n_acc < k:  # both caches hold n + k positions; drop the k - n_acc rejected ones
                dcache.crop(n_acc - k)
                tcache.crop(n_acc - k)
            n += n_acc + 1
            cur = torch.tensor([[nxt]], device=dev)

            stats.steps += 1
            stats.drafted += k
            stats.accepted += n_acc
            if counts is not None:
                pad = -(-n_keys // self.chunk_size) * self.chunk_size - n_keys  # the newest chunk is always read
                kv_read += (counts.double() * self.chunk_size - pad) / n_keys
            stats.time_draft += t1 - t0
            stats.time_select += t2 - t1
            stats.time_verify += t3 - t2

            if eos_token_id is not None and eos_token_id in new:
                new = new[: new.index(eos_token_id) + 1]
            new = new[: max_new_tokens - len(out)]
            out.extend(new)
            if on_tokens is not None:
                on_tokens(new)
            if eos_token_id is not None and new and new[-1] == eos_token_id:
                break
        stats.kv_read_sum = [float(stats.steps)] * len(self.layer_map)  # dense layers read everything
        for j, v in zip(self.sparse_layers, kv_read.tolist()):
            stats.kv_read_sum[j] = v
        stats.new_tokens = len(out)
        stats.time_total = time.perf_counter() - t_start
        return GenerationOutput(out, stats)
