"""``SpecAttnRuntime``: speculative decoding whose verification reads only the KV chunks the draft points at.

One step (batch 1):

1. the draft proposes ``k`` tokens in ``k`` forwards (dense attention), the first over the previous and the last
   emitted token (the previous position needs its draft K/V when the last step accepted every draft); the mapped
   draft layers record the new query's chunk-pooled attention (``k`` rows: the last emitted token and the first
   ``k - 1`` drafts);
2. per sparse target layer, the rows of its draft layer are summed and top-p selected (sink chunk and every chunk
   holding a verified position always kept): one chunk set per layer, shared by all ``k + 1`` verified queries;
   with an artifact that has a head map, one per (sparse layer, target KV head), from the rows of its mapped draft
   KV head, with that head's p (both engines);
3. the target verifies the ``k + 1`` positions in one forward, sparse layers through the block-sparse backend;
4. greedy or rejection-sampling acceptance; both caches are rolled back to the accepted prefix.

A mode ``self`` artifact (no draft model) runs self-speculation instead: the target drafts with sparse attention
over the chunks its last dense verification attended to and verifies densely (lossless); the eager loop
(:mod:`specattn_runtime.selfspec`) selects per KV head, the decode engine (``engine/self_step.py``) per layer.

Two implementations of the draft-mode step behind one ``generate``: the static-shape decode engine (``engine/``:
preallocated caches with device-side lengths, attention reading them, each phase captured as a CUDA graph, one
host read per step), the default on CUDA; and the eager loop (``eager.py``: transformers' caches, host control
flow), the default elsewhere and the reference the engine is tested against. ``k = 0`` decodes the target alone
(plain autoregressive decoding through the same attention and caches).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from . import hooks, rng, validate
from .artifact import Artifact, load_artifact
from .engine import DecodeEngine, KVStore, SelfSpecEngine, SparsePlan, make_forward, self_plan
from .engine.batch import BatchEngine
from .engine.step import sampling_mode
from .fingerprint import config_hash, tokenizer_hash, weights_hash
from .models import check_model_dir, load_causal_lm, load_tokenizer, special_prefix
from .moe import use_capturable_experts
from .stats import GenerationOutput, GenerationStats, TokenSink, kv_read_sums
from .variants import check_supported, layer_windows, model_features

CAPACITY_STEP = 2048  # caches (and the graphs captured over them) come in multiples of this many positions


def check_mode(art: Artifact, path, draft) -> None:
    """A ``draft`` artifact needs its draft model; a ``self`` artifact (the target drafts for itself) takes none."""
    mode = art.metadata["mode"]
    if mode == "self" and draft is not None:
        raise ValueError(f"{path} is a self-speculative artifact (mode 'self'): the target drafts for itself, so "
                         "pass target= only, no draft")
    if mode == "draft" and draft is None:
        raise ValueError(f"{path} is a draft-guided artifact (mode 'draft'): pass the draft model it was calibrated "
                         f"with (draft=DIR; it was {art.info('draft_model').get('name', '?')!r})")


def check_against_models(art: Artifact, draft_dir: Path | None, target_dir: Path, n_draft: int | None,
                         n_target: int, allow_mismatch: bool) -> None:
    """Layer counts always; config/weights/tokenizer hashes unless ``allow_mismatch``. Errors name both sides.
    ``draft_dir`` None: a mode ``self`` artifact, checked against the target alone."""
    if art.n_target_layers != n_target:
        raise ValueError(f"artifact is for a target with {art.n_target_layers} layers; {target_dir} has {n_target}")
    if draft_dir is not None and art.n_draft_layers != n_draft:
        raise ValueError(f"artifact is for a draft with {art.n_draft_layers} layers; {draft_dir} has {n_draft}")
    if allow_mismatch:
        return
    checks = [("target_model", "config_hash", config_hash(target_dir)),
              ("target_model", "weights_hash", weights_hash(target_dir))]
    if draft_dir is not None:
        checks += [("draft_model", "config_hash", config_hash(draft_dir)),
                   ("draft_model", "weights_hash", weights_hash(draft_dir))]
    for field_, key, have in checks:
        want = art.info(field_).get(key)
        model = target_dir if field_ == "target_model" else draft_dir
        if want is None:
            raise ValueError(f"artifact {field_} has no {key}, so it cannot be checked against {model}; pass "
                             "allow_mismatch=True to use it unchecked")
        if want != have:
            raise ValueError(f"artifact {field_}.{key} is {str(want)[:16]}... but {model} has {have[:16]}...: it was "
                             "calibrated on other weights; recalibrate, or pass allow_mismatch=True to use it anyway")
    tok = tokenizer_hash(target_dir)
    if art.metadata["tokenizer_hash"] != tok:
        raise ValueError(f"artifact tokenizer_hash {art.metadata['tokenizer_hash'][:16]}... differs from "
                         f"{target_dir}'s {tok[:16]}...")


def check_window_prefix(art: Artifact, tokenizer, target_dir: Path) -> None:
    """The special tokens the target's tokenizer puts before text must be those the calibration windows began with.

    ``tokenizer_hash`` covers the vocabulary and merges, not the post-processor that adds a BOS, so a tokenizer
    re-saved with its BOS switched on or off hashes the same. Its prompts would then start differently from the
    windows the p's were tuned on (the first token is the attention sink), which nothing else would catch.
    Artifacts written before ``window_prefix`` existed are not checked."""
    want = art.window_prefix
    if want is None:
        return
    have = special_prefix(tokenizer)
    if have != want:
        raise ValueError(f"artifact was calibrated on windows that start with {want} (the tokenizer's special "
                         f"tokens then) but {target_dir}'s tokenizer puts {have} before text: its BOS setting "
                         "changed since calibration; recalibrate, or pass allow_mismatch=True to use it anyway")


# Mixture-of-experts models whose experts the runtime switches to moe.py's capturable implementation
MOE_MODEL_TYPES = frozenset({"gpt_oss"})


class SpecAttnRuntime:
    """Sparse speculative generation driven by a calibration artifact. Build with :meth:`from_artifact`.

    ``engine``: ``"static"`` (the decode engine; CUDA graphs and ``torch.compile`` on CUDA), ``"eager"`` (the
    reference loop) or ``"auto"`` (static on CUDA, eager elsewhere). ``compile`` (default: on CUDA) fuses each
    model forward of the static engine with ``torch.compile``. ``per_head``: with an artifact that has a head map,
    select one chunk set per (sparse layer, KV head) (default: on with the torch or Triton backend, in both
    engines; ``per_head=False`` selects per layer from head-averaged rows, with the artifact's ``top_p``).
    ``sparse_draft``: with an artifact that has ``draft_top_p`` (schema 3), the draft reads sparsely after each
    step's first forward (default on; ``False`` drafts densely). ``sparse_draft_guidance``: which draft forwards
    give the target's selection its rows when drafting sparsely: ``"first"`` (default: the step's dense first
    forward) or ``"all"`` (the sparse ones too, their mass confined to the draft's own selection).
    """

    engine_class = DecodeEngine  # benchmarks substitute a subclass (forced acceptance on random weights)
    batch_engine_class = BatchEngine  # likewise for generate_batch

    def __init__(self, artifact: Artifact, draft, target, tokenizer=None, *, backend: str = "auto",
                 selection: str = "auto", exact_dense_shortcut: bool = True, engine: str = "auto",
                 compile: bool | None = None, per_head: bool | None = None, sparse_draft: bool = True,
                 sparse_draft_guidance: str = "first"):
        dev = next(target.parameters()).device
        on_cuda = dev.type == "cuda"
        validate.kernels(backend, selection, engine, dev)
        self.mode = artifact.metadata["mode"]
        check_mode(artifact, "the artifact", draft)
        if self.mode == "self":
            # The target drafts for itself. The eager loop selects per KV head (torch or Triton attention); the
            # decode engine selects per layer (its kernels take one index list per layer; both are lossless).
            if backend == "flashinfer":
                raise ValueError("a self-speculative artifact (mode 'self') runs with backend 'torch' or 'triton'; "
                                 "the FlashInfer wrapper takes one selection per layer")
            draft = target
        uncapturable = set()
        for m in {id(draft): draft, id(target): target}.values():
            _use_specattn_attention(m)
            # transformers' default experts (grouped_mm) copy between host and device, which a CUDA graph cannot
            # capture; moe.py's experts can. Switched on every device, so the CPU engine runs what the GPU captures.
            if m.config.model_type in MOE_MODEL_TYPES and not use_capturable_experts(m):
                uncapturable.add(m.config.model_type)
        self.artifact, self.draft, self.target, self.tokenizer = artifact, draft, target, tokenizer
        # Sliding windows, soft-capping and sinks: the torch and Triton backends implement them in both engines
        # (the kernels take each layer's variant); FlashInfer's block-sparse wrapper does not and refuses them.
        variant_models = {f for m in (draft, target) for f in model_features(m.config)}
        if variant_models and backend == "flashinfer":
            raise ValueError(f"the models use {', '.join(sorted(variant_models))}, which FlashInfer's block-sparse "
                             "wrapper does not implement; use backend 'triton' (or 'torch')")
        # What the GPUs checked (bench/RESULTS.md, 2026-12-04 and -05): CUDA graphs equal the eager loop on Mistral,
        # Qwen2 with window layers, Gemma 2, Gemma 3 and GPT-OSS; compiled graphs equal transformers' greedy on
        # Gemma 3 (single sequence; Mistral before window-sized caches), not yet on the others or batched on CUDA
        # (on the CPU all of them, tests/test_engine_variants.py; the earlier CUDA failures match dynamo's recompile
        # limit, fixed in engine/forward.py), and are not timed: so compile is opt-in (compile=True) for them.
        # A mixture-of-experts model whose transformers cannot switch its experts to moe.py's (grouped_mm routing
        # copies host tensors: not capturable) stays on the eager loop.
        uncapturable = sorted(uncapturable)
        if engine == "static" and on_cuda and uncapturable:
            raise ValueError(f"{', '.join(uncapturable)} cannot run on the decode engine on CUDA: this transformers "
                             "cannot switch its experts to the capturable implementation (specattn_runtime/moe.py), "
                             "and its own (grouped_mm) copies host tensors, which a CUDA graph cannot capture; use "
                             "engine='auto' or 'eager'")
        if engine == "auto" and on_cuda and uncapturable:
            warnings.warn(f"{', '.join(uncapturable)}: its forward cannot be captured as a CUDA graph (this "
                          "transformers cannot switch its experts to specattn_runtime/moe.py's, and grouped_mm "
                          "routing copies host tensors); running the eager loop", stacklevel=2)
            engine = "eager"
        self.engine = ("static" if on_cuda else "eager") if engine == "auto" else engine
        self.compile = (on_cuda and not variant_models) if compile is None else bool(compile)
        if selection == "auto":  # the Triton kernel where it compiles, the same search in torch elsewhere
            selection = "triton" if on_cuda else "threshold"
        if backend == "auto":
            backend = "triton" if on_cuda else "torch"
        self.backend, self.selection = backend, selection
        for m in (draft, target):  # chunked / linear / state-space layers and per-layer configs: refused by name
            check_supported(m.config, variants=True, triton=backend == "triton")
        self.chunk_size = artifact.chunk_size
        self.windows = layer_windows(target.config)  # per target layer: its sliding window or None
        self.layer_map = artifact.layer_map.tolist()
        self.per_head = self._choose_per_head(artifact, per_head)
        self.top_p = artifact.top_p.tolist()
        # Layers with p >= 1 read everything: keep them on the dense path (exact and cheaper). Turning the shortcut
        # off routes them through selection and the sparse backend, which must then reproduce dense decoding.
        sparse_p = artifact.top_p_head.amin(1).tolist() if self.per_head else self.top_p
        self.sparse_layers = [j for j, (i, p) in enumerate(zip(self.layer_map, sparse_p))
                              if i >= 0 and (p < 1.0 or not exact_dense_shortcut)]
        self.record_layers = frozenset(self.layer_map[j] for j in self.sparse_layers)
        if self.per_head:  # one selection row per (sparse layer, target KV head)
            self.head_map = {j: artifact.head_map[j].long() for j in self.sparse_layers}
            n_draft_heads = draft.config.num_key_value_heads
            if any(int(h.max()) >= n_draft_heads for h in self.head_map.values()):
                raise ValueError(f"the artifact's head_map names draft KV heads beyond the draft's {n_draft_heads}")
            self._sparse_p = artifact.top_p_head[self.sparse_layers].flatten().float()
        else:
            self._sparse_p = torch.tensor([self.top_p[j] for j in self.sparse_layers])
        heads = {}
        if self.per_head:  # the decode engine's form of the same rows and p
            heads = dict(head_map=tuple(tuple(self.head_map[j].tolist()) for j in self.sparse_layers),
                         top_p_head=tuple(tuple(artifact.top_p_head[j].tolist()) for j in self.sparse_layers))
        # Sparse drafting (schema 3): draft layers with p < 1 read, after each step's first draft forward, only the
        # top-p chunks of that forward's attention. Older artifacts, mode "self" and sparse_draft=False draft densely.
        dp = artifact.draft_top_p if sparse_draft and self.mode == "draft" else None
        self.draft_top_p = dp.tolist() if dp is not None else []
        if sparse_draft_guidance not in ("first", "all"):
            raise ValueError(f"sparse_draft_guidance must be 'first' (the target's selection from each step's dense "
                             f"first draft forward) or 'all' (every draft forward), got {sparse_draft_guidance!r}")
        self.draft_sparse_layers = [i for i, p in enumerate(self.draft_top_p) if p < 1.0]
        self._draft_p = torch.tensor([self.draft_top_p[i] for i in self.draft_sparse_layers])
        self.plan = SparsePlan(tuple(self.sparse_layers), tuple(self.layer_map[j] for j in self.sparse_layers),
                               tuple(self.top_p[j] for j in self.sparse_layers), self.chunk_size, **heads,
                               draft_sparse_layers=tuple(self.draft_sparse_layers),
                               draft_top_p=tuple(self.draft_top_p[i] for i in self.draft_sparse_layers),
                               sparse_forwards_guide=sparse_draft_guidance == "all")
        # GPU work is asynchronous: the eager loop's time split is only honest if each phase has finished.
        self._sync = torch.cuda.synchronize if on_cuda else (lambda: None)
        self._caches = _Caches()
        self._engines: dict[tuple, DecodeEngine] = {}
        self._forwards: dict[str, object] = {}
        self._pool = None  # the batched engine's paged KV pool (engine/pages.py), kept between calls
        self._runners: dict[tuple, object] = {}

    def _choose_per_head(self, artifact: Artifact, per_head: bool | None) -> bool:
        """Per-KV-head selection where the artifact has a head map and the backend reads per-head selections
        (torch or Triton, in the eager loop and in the decode engine), unless ``per_head=False``."""
        if per_head and not artifact.per_head:
            # head maps exist for mode 'draft' only (validated on load): self-speculation's engine selects per layer
            raise ValueError("per_head=True needs an artifact with a head map (mode 'draft', calibrated by specattn "
                             "with schema 2); a mode 'self' artifact selects per layer in the decode engine")
        if not artifact.per_head or per_head is False:
            return False
        supported = self.backend in ("torch", "triton")  # FlashInfer's wrapper takes one selection per layer
        if per_head and not supported:
            raise ValueError(f"per-KV-head selection needs backend 'torch' or 'triton' (engine 'eager' or 'static'); "
                             f"got backend={self.backend!r} (or pass per_head=False)")
        return supported

    @classmethod
    def from_artifact(cls, path: str | Path, *, target: str | Path, draft: str | Path | None = None,
                      device: str = "cpu", dtype: torch.dtype = torch.float32, backend: str = "auto",
                      selection: str = "auto", allow_mismatch: bool = False, **kwargs) -> "SpecAttnRuntime":
        """Load the artifact and its models, refusing models the artifact was not calibrated for.

        Parameters
        ----------
        path : str or Path
            Artifact ``.safetensors`` (e.g. ``artifacts/quick/latest.safetensors``).
        target : str or Path
            Local model directory of the target.
        draft : str or Path, optional
            Local model directory of the draft: required by a mode ``draft`` artifact, refused by a mode ``self``
            one (the target drafts for itself).
        allow_mismatch : bool
            Accept differing config/weight/tokenizer hashes and a tokenizer whose BOS setting differs from the
            calibration windows' (layer counts must still match).
        **kwargs
            ``engine``, ``compile``, ``exact_dense_shortcut``: see the class.
        """
        dev = validate.device(device)  # everything that can be checked is checked before a model loads
        validate.kernels(backend, selection, kwargs.get("engine", "auto"), dev)
        art = load_artifact(path)
        check_mode(art, path, draft)
        d = check_model_dir(draft, "draft") if draft is not None else None
        t = check_model_dir(target, "target")
        tokenizer = load_tokenizer(t, "target")
        if not allow_mismatch:
            check_window_prefix(art, tokenizer, t)
        name = hooks.register()
        draft_model = None if d is None else load_causal_lm(d, role="draft", dtype=dtype, device=device,
                                                            attn_implementation=name)
        target_model = load_causal_lm(t, role="target", dtype=dtype, device=device, attn_implementation=name)
        check_against_models(art, d, t, None if d is None else draft_model.config.num_hidden_layers,
                             target_model.config.num_hidden_layers, allow_mismatch)
        return cls(art, draft_model, target_model, tokenizer, backend=backend, selection=selection, **kwargs)

    # -- generation ---------------------------------------------------------------------------------------------

    def generate(self, prompt_ids, max_new_tokens: int = 256, *, k: int = 6, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | None = None, seed: int | None = None,
                 on_tokens=None) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` tokens after ``prompt_ids``.

        Parameters
        ----------
        prompt_ids : sequence of int or torch.Tensor
            ``[n]`` or ``[1, n]`` token ids, ``n >= 1``, each in ``[0, vocab_size)`` (checked; one prompt only).
        k : int
            Drafted tokens per verification; ``0`` decodes the target alone (autoregressive, no draft).
        temperature, top_p : float
            ``temperature == 0``: greedy; otherwise sampling with nucleus ``top_p`` through rejection sampling.
        eos_token_id : int, optional
            Defaults to the tokenizer's; generation stops after emitting it.
        seed : int, optional
            Seeds the sampling draws (the same seed gives the same tokens on every engine); default: drawn from
            torch's default generator.
        on_tokens : callable, optional
            Called with each step's list of new tokens (for streaming).

        The static engine captures its CUDA graphs on the first call for a given ``k``, sampling mode and cache
        size (``stats.time_capture``; later calls reuse them) and reuses the cached prompt prefix of the previous
        call (only the new suffix is prefilled).
        """
        vocab = min(m.get_input_embeddings().num_embeddings for m in ((self.target, self.draft) if k else
                                                                        (self.target,)))
        validate.generation(max_new_tokens, k, temperature, top_p, seed, eos_token_id, vocab)
        ids = validate.prompt_ids(prompt_ids, vocab)
        validate.calibrated_prefix(ids, self.artifact.metadata, self)  # warns once if the prompt lacks the BOS
        n = len(ids)
        limit = self.context_limit(k)
        if n + max_new_tokens + k + 1 > limit:
            raise ValueError(f"prompt of {n} tokens + max_new_tokens={max_new_tokens} + k={k} exceeds the models' "
                             f"context of {limit} tokens; shorten the prompt or generate fewer tokens")
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        seed = rng.new_seed() if seed is None else int(seed) % 2**62
        args = (ids, max_new_tokens, k, temperature, top_p, eos_token_id, seed, on_tokens)
        if self.engine == "static":
            return self._generate_static(*args)
        from .eager import generate_eager
        from .selfspec import generate_self_eager

        loop = generate_self_eager if self.mode == "self" and k else generate_eager
        if not next(self.target.parameters()).is_cuda:
            return loop(self, *args)
        # cuDNN's SDPA builds a new plan for every KV length, ~1.4 ms of host time per layer and step on an H100
        # (bench/RESULTS.md): the eager loop runs without it, scoped to this call.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return loop(self, *args)

    def context_limit(self, k: int) -> int:
        """Positions the models (the target, and the draft when ``k > 0``) were built for."""
        models = (self.target, self.draft) if k else (self.target,)
        return min(m.config.max_position_embeddings for m in models)

    def generate_batch(self, prompts, max_new_tokens: int = 256, *, k: int = 6, temperature: float = 0.0,
                       top_p: float = 1.0, eos_token_id: int | None = None, seed=None, max_batch: int | None = None,
                       kv_memory_gb: float | None = None, kv_memory_fraction: float | None = None,
                       prefill_tokens: int | None = None) -> list[GenerationOutput]:
        """Generate for many prompts at once; one :class:`GenerationOutput` per prompt, in input order.

        Sequences finish independently (EOS or ``max_new_tokens``; ``finish_reason`` says which). The decode engine
        runs them as one batch over a paged KV pool (continuous batching past ``max_batch``, default 64); the eager
        engine runs each prompt alone (the reference).

        Parameters
        ----------
        prompts : list
            Prompts, each as :meth:`generate` takes one (token ids).
        max_new_tokens, k, temperature, top_p, eos_token_id
            As :meth:`generate`, shared by every prompt.
        seed : int or list of int, optional
            An int seeds every sequence alike (its draws are keyed by its own seed and step: a sequence samples
            the same tokens alone and in any batch); a list gives one seed per prompt.
        max_batch : int, optional
            Sequences decoded at once (default: all, up to 64); the rest wait for a slot.
        kv_memory_gb, kv_memory_fraction : float, optional
            Size of the paged KV pool (both models): GiB, or a fraction of the free GPU memory. Default: what the
            batch needs. A batch that cannot fit is refused before any work, with the numbers.
        prefill_tokens : int, optional
            Tokens per prefill forward (default 4096): bounds the prefill's activations and masks.
        """
        from .batched import generate_batch

        return generate_batch(self, prompts, max_new_tokens, k=k, temperature=temperature, top_p=top_p,
                              eos_token_id=eos_token_id, seed=seed, max_batch=max_batch, kv_memory_gb=kv_memory_gb,
                              kv_memory_fraction=kv_memory_fraction, prefill_tokens=prefill_tokens)

    def _batch_pool(self, seqs, slots: int, kv_memory_gb, kv_memory_fraction):
        """The paged pool for a batch (kept between calls; a new pool drops the engines captured over the old)."""
        from .batched import PAGE_SIZE, pool_pages
        from .engine.pages import PagedKVPool

        models = {"target": self.target} if self.mode == "self" else {"target": self.target, "draft": self.draft}
        n_pages = pool_pages(models, seqs, slots, kv_memory_gb, kv_memory_fraction, self._pool)
        if n_pages is not None:  # free the old pool (and the graphs over it) before allocating the new one
            self.release_caches(single=False)
            self._pool = PagedKVPool(models, n_pages, PAGE_SIZE, ring_sequences=slots)
        return self._pool

    def _batch_runner(self, k: int, temperature: float, top_p: float, slots: int, seqs, pool, prefill_tokens):
        from .batched import max_pages_for, runner_for

        sampling = sampling_mode(temperature, top_p)
        key = (k, sampling, slots, max_pages_for(seqs, pool), prefill_tokens)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners[key] = runner_for(self, k, sampling, slots, key[3], pool, prefill_tokens)
        return runner

    @torch.no_grad()
    def _generate_static(self, ids: list[int], max_new_tokens: int, k: int, temperature: float, top_p: float,
                         eos_token_id: int | None, seed: int, on_tokens) -> GenerationOutput:
        stats = GenerationStats(engine="static", accepted_hist=[0] * (k + 1))
        t_start = time.perf_counter()
        sampling = sampling_mode(temperature, top_p)
        eng = self._engine_for(k, sampling, len(ids) + max_new_tokens + k + 1)
        eng.capture()
        t_prefill = time.perf_counter()
        stats.time_capture = t_prefill - t_start  # cache allocation, warm-up and graph capture: first use only
        for role in ("target", "draft") if k and self.mode != "self" else ("target",):
            eng.store.prefill(role, ids[:-1])
        eng.start(len(ids) - 1, ids[-1], ids[-2] if len(ids) > 1 else None, seed=seed,
                  temperature=max(temperature, 1e-6), top_p=top_p)
        self._sync()
        stats.time_prefill = time.perf_counter() - t_prefill
        sink = TokenSink(max_new_tokens, eos_token_id, on_tokens)
        while not sink.done:
            new = eng.step()
            stats.steps += 1
            stats.accepted += len(new) - 1
            stats.accepted_hist[len(new) - 1] += 1
            sink.add(new)
        stats.drafted = k * stats.steps
        stats.kv_read_sum = kv_read_sums(len(self.layer_map), stats.steps, self.plan.sparse_layers,
                                         eng.kv_read_sum())
        if k and self.mode == "draft":
            stats.draft_kv_read_sum = kv_read_sums(self.draft.config.num_hidden_layers, stats.steps,
                                                   eng.plan.draft_sparse_layers, eng.draft_kv_read_sum())
        times = eng.times  # the accept phase and the host loop are what "other" is made of
        stats.time_draft, stats.time_select, stats.time_verify = times.draft, times.select, times.verify
        stats.new_tokens = len(sink.tokens)
        stats.time_total = time.perf_counter() - t_start
        return GenerationOutput(sink.tokens, stats, sink.finish_reason)

    # -- the decode engine's caches and graphs ------------------------------------------------------------------

    def _engine_for(self, k: int, sampling: str, need: int) -> DecodeEngine:
        """The engine for ``(k, sampling)`` over caches of at least ``need`` positions (built and captured once)."""
        caches = self._caches
        if caches.store is None or caches.store.capacity < need:
            self.release_caches(batch_pool=False)
            limit = self.target.config.max_position_embeddings
            capacity = min(-(-need // CAPACITY_STEP) * CAPACITY_STEP, max(limit, need))
            roles = {"target": self.target} if self.mode == "self" else {"target": self.target, "draft": self.draft}
            caches.store = KVStore(roles, capacity)
        key = (k, sampling)
        eng = self._engines.get(key)
        if eng is None or eng.store is not caches.store:  # new, or its caches were replaced through a sharer
            plan = self.plan if k else SparsePlan(chunk_size=self.chunk_size)
            cls = self.engine_class
            if self.mode == "self" and k:  # the target drafts for itself, one cache
                plan = self_plan(self.sparse_layers, [self.top_p[j] for j in self.sparse_layers], self.chunk_size)
                cls = SelfSpecEngine
            eng = self._engines[key] = cls(
                self.target, caches.store, plan, k, self._model_forwards(), sampling=sampling,
                backend=self.backend, graphs=next(self.target.parameters()).is_cuda)
        return eng

    def _model_forwards(self) -> dict:
        if not self._forwards:
            self._forwards = {"target": make_forward(self.target, self.compile)}
            if self.mode != "self":
                self._forwards["draft"] = make_forward(self.draft, self.compile)
        return self._forwards

    def share_caches_with(self, other: "SpecAttnRuntime") -> None:
        """Use the same preallocated caches as ``other`` (same model objects): comparing artifacts on one long
        prompt then needs one set of caches and one prefill. The two must not generate at the same time."""
        if other.target is not self.target or other.draft is not self.draft:
            raise ValueError("share_caches_with needs a runtime over the same draft and target model objects")
        self._engines.clear()
        self._caches = other._caches
        self._forwards = self._forwards or other._forwards  # compiled forwards are per model too

    def release_caches(self, batch_pool: bool = True, single: bool = True) -> None:
        """Free the decode engine's caches and graphs (``single``; shared caches: for every sharer) and, with
        ``batch_pool``, ``generate_batch``'s paged pool and its graphs; the next call allocates and captures again."""
        if single:
            self._engines.clear()
            self._caches.store = None
        if batch_pool:
            self._runners.clear()
            self._pool = None
        if torch.cuda.is_available():
            import gc

            gc.collect()  # an engine and its bound phase methods form a cycle: free the caches now, not later
            torch.cuda.empty_cache()


def _use_specattn_attention(model) -> None:
    """Route ``model``'s attention through the ``"specattn"`` function (hooks.py), which both engines drive.

    Models loaded by :meth:`SpecAttnRuntime.from_artifact` already use it; a model the caller loaded with its
    default attention (SDPA, eager) is switched in place. Outside a SpecAttn step the function computes the layer's
    own dense attention, so the model's other uses are unchanged. Without the switch the eager loop's selection and
    the engine's cache would silently never run.
    """
    name = hooks.register()
    if model.config._attn_implementation == name:
        return
    before = model.config._attn_implementation
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__} uses attention {before!r} and could not be switched to {name!r}; "
                         f"load it with attn_implementation=specattn_runtime.hooks.register() (as "
                         "SpecAttnRuntime.from_artifact does)")


class _Caches:
    """The KV store a runtime uses, in a holder that ``share_caches_with`` hands to other runtimes."""

    store: KVStore | None = None
