"""End-to-end decoding speed on a GPU: every method in one process, on the same weights, side by side.

Methods (the ``method`` key of each JSON row):

- ``hf_compiled_ar``: what a user who knows transformers already has: ``StaticCache``, prefill in chunks, the
  one-token step compiled with ``torch.compile(mode="reduce-overhead", fullgraph=True)``, greedy, each token read
  back as it is produced. Its compilation and graph recording are excluded (warm-up steps).
- ``ar``: this runtime with ``k = 0`` (the decode engine: the target alone, each step a captured graph).
- ``spec_dense``: this runtime, speculative, every target layer verified densely.
- ``specattn``: this runtime, speculative, sparse verification (one chunk set per layer, head-averaged draft rows).
- ``specattn_head``: the same with per-KV-head selection (an artifact with a head map: target KV head ``h`` guided
  by draft KV head ``h * Hkv_draft // Hkv_target``, the same forced p on every head): the draft records one row
  per KV head, top-p runs per (sparse layer, target KV head), the verification reads per-head index lists.
- ``specattn_sd``: ``specattn`` with sparse drafting: after each step's first (dense) draft forward, every draft
  layer but the first reads only the top-p chunks (``--draft-density``) of that forward's attention. Rows carry
  ``draft_kv_read`` (the later forwards' share) and ``draft_floor_ms`` (the draft phase's bytes over bandwidth).
- ``self_spec``: self-speculation (``SelfSpecEngine``): the target alone drafts ``k`` tokens with sparse attention
  over the chunks selected from its previous dense verification's recorded attention, then verifies densely.

Models are real architectures built from their configs with random bf16 weights (nothing to download): Llama-2-7B
target + TinyLlama-1.1B draft (``llama2``, MHA target), Llama-3.1-8B + Llama-3.2-1B (``llama3``, GQA), Gemma-3-12B
+ Gemma-3-1B (``gemma3``: five sliding-window layers per global one, windows of 1,024 / 512, head_dim 256, one KV
head in the draft; both vocabularies at the 1B's 262,144 so that every target token is a draft token). Window layers
shorter than the calibration rule's minimum (``pipelines/candidates.py``) stay dense in the forced artifacts, as a
calibration would leave them, and keep window-sized (ring) caches; rows carry ``kv_bytes`` (the caches allocated)
beside ``kv_bytes_full`` (every layer at full length). Random weights show neither acceptance nor sparsity, so both
are **forced**, and said so in every table:

- acceptance: the engine's acceptance is replaced by a fixed cycle of accepted counts whose mean tokens per step
  is ``--accepted-length`` (on the device, inside the captured accept phase);
- density: the artifact's p on every sparse layer is ``--density``; on near-uniform random attention top-p keeps
  about that share of chunks; rows report the KV share the verification actually read. ``self_spec`` takes its
  pairs from ``--self-accepted-length`` / ``--self-density`` (its drafts read that share; rows report it).

Everything else is real: the draft's k + 1 forwards with fused attention recording, Triton top-p selection,
block-sparse verification, rollback, the host loop with its one read per step. Floors: bytes a step must read
(weights once per forward, KV of the positions attended) over the measured copy bandwidth. ``--methods`` runs a
subset (e.g. ``hf_compiled_ar ar self_spec``: then no draft model is built, and ``ar`` runs its engine directly over
the self-speculation's caches).

    python3 bench/e2e.py --pair llama2 --contexts 8192 32768 65536 --out bench/e2e_llama2_h100.json
    python3 bench/e2e.py --pair llama2 --contexts 131072 --methods hf_compiled_ar ar self_spec --k 4 \
        --self-accepted-length 3.0 3.5 --self-density 0.10 0.05 --out bench/e2e_self_spec_h200.json
    python3 bench/e2e.py --pair gemma3 --contexts 32768 131072 --methods hf_compiled_ar ar spec_dense specattn \
        self_spec --k 4 --accepted-length 3.0 --density 0.4 --out bench/e2e_gemma3_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ itself is sys.path[0]: replace it (its kernels.py would shadow the `kernels` package
# that transformers imports where it is installed)
sys.path[0:1] = [str(ROOT)] if Path(sys.path[0]).resolve() == ROOT / "bench" else [str(ROOT), sys.path[0]]

from bench.kernels import copy_bandwidth  # noqa: E402
from specattn_runtime import SpecAttnRuntime, hooks  # noqa: E402
from specattn_runtime.engine import (DecodeEngine, KVStore, SelfSpecEngine, SparsePlan, StepTimes,  # noqa: E402
                                     make_forward, self_plan)
from specattn_runtime.variants import layer_windows, model_features  # noqa: E402
from pipelines.candidates import short_window_layers, sparse_candidates  # noqa: E402 (no Prefect import)

METHODS = ("hf_compiled_ar", "ar", "spec_dense", "specattn", "self_spec", "specattn_head", "specattn_sd")
SPEC_METHODS = {"spec_dense", "specattn", "specattn_head", "specattn_sd"}  # need the draft model and the runtime

GEMMA3_LOCAL = 5  # Gemma 3: five sliding-window layers, then a global one


def gemma3(n_layers: int, **cfg) -> dict:
    return dict(model_type="gemma3_text", num_hidden_layers=n_layers, head_dim=256, query_pre_attn_scalar=256,
                vocab_size=262144, layer_types=["full_attention" if (j + 1) % (GEMMA3_LOCAL + 1) == 0 else
                                                "sliding_attention" for j in range(n_layers)], **cfg)


PAIRS = {
    # (target config, draft config): public architecture hyper-parameters (``model_type`` default "llama")
    "llama2": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0),
               dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0)),
    "llama3": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
               dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True)),
    "gemma3": (gemma3(48, hidden_size=3840, intermediate_size=15360, num_attention_heads=16, num_key_value_heads=8,
                      sliding_window=1024),
               gemma3(26, hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1,
                      sliding_window=512)),
}


def build(cfg: dict, max_pos: int, device: str = "cuda"):
    """A random-weight bf16 model of the architecture ``cfg`` describes (``model_type``, default "llama")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg)
    model_type = cfg.pop("model_type", "llama")
    if model_type == "llama":
        cfg["rms_norm_eps"] = 1e-5
    config = AutoConfig.for_model(model_type, **cfg, max_position_embeddings=max_pos)
    config._attn_implementation = hooks.register()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=hooks.register()).to(torch.bfloat16)
    return model.eval()


def dense_window_layers(model) -> list[int]:
    """The layers whose sliding window the calibration rule keeps dense (``pipelines/candidates.py``)."""
    return short_window_layers(layer_windows(model.config))


def forced_cycle(accepted_length: float, k: int, n: int = 64) -> list[int]:
    """``n`` accepted-draft counts (each <= ``k``) whose mean is ``accepted_length - 1``, spread evenly."""
    a = accepted_length - 1
    return [min(k, math.floor(s * a) - math.floor((s - 1) * a)) for s in range(1, n + 1)]


class ForcedAcceptanceMixin:
    """An engine with its accepted count forced to a fixed cycle averaging ``accepted_length - 1`` drafts per step
    (set on the class or the instance before ``start``; read into a device buffer when a generation starts)."""

    accepted_length = 1.0
    CYCLE = 64

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = torch.zeros(self.CYCLE, dtype=torch.int64, device=self.device)

    def start(self, *args, **kwargs) -> None:
        super().start(*args, **kwargs)
        self.schedule.copy_(torch.tensor(forced_cycle(self.accepted_length, self.k, self.CYCLE)))

    def _accept(self):
        n = self.schedule.index_select(0, self.step_no % self.CYCLE)
        target = self.tlogits.argmax(-1)  # the target's tokens are computed and emitted, as greedy would
        return n, target


class ForcedAcceptance(ForcedAcceptanceMixin, DecodeEngine):
    """The draft-model engine with forced acceptance (the runtime builds it: ``engine_class``)."""


class ForcedSelfAcceptance(ForcedAcceptanceMixin, SelfSpecEngine):
    """The self-speculative engine with forced acceptance; its drafting still reads the top-p selection of the
    recorded attention, at the p in its ``sel_p`` buffer (the forced density)."""


def artifact_for(n_t: int, n_d: int, density: float, dense_layers: int = 2, heads: tuple[int, int] | None = None,
                 draft_density: float | None = None, draft_dense_layers: int = 1, target_dense=(), draft_dense=()):
    """A synthetic artifact: target layers mapped proportionally onto draft layers, p = density. ``heads``
    ``(target KV heads, draft KV heads)``: with a head map (each target KV head guided by the draft KV head at the
    same relative index) and p = density on every head. ``draft_density``: sparse drafting, that p on every draft
    layer after the first ``draft_dense_layers``. ``target_dense`` / ``draft_dense``: other layers kept dense (short
    sliding windows)."""
    from specattn_runtime.artifact import FORMAT, SCHEMA_VERSION, Artifact

    layer_map = [-1 if j < dense_layers or j in target_dense else min(n_d - 1, round(j * (n_d - 1) / (n_t - 1)))
                 for j in range(n_t)]
    top_p = [1.0 if m < 0 else density for m in layer_map]
    meta = {"format": FORMAT, "schema_version": str(SCHEMA_VERSION), "mode": "draft", "chunk_size": "16",
            "dense_layers": str(dense_layers), "draft_model": json.dumps({"name": "random", "n_layers": n_d}),
            "target_model": json.dumps({"name": "random", "n_layers": n_t}), "tokenizer_hash": "-",
            "calibration_corpus": "{}", "objective": json.dumps({"kind": "forced_density", "density": density}),
            "holdout_quality": "{}", "created_at": datetime.now(timezone.utc).isoformat(), "specattn_version": "bench"}
    art = Artifact(torch.tensor(layer_map, dtype=torch.int32), torch.tensor(top_p), torch.zeros(n_t, n_d), meta)
    if draft_density is not None:
        dp = [1.0 if i < draft_dense_layers or i in draft_dense else draft_density for i in range(n_d)]
        art = dataclasses.replace(art, draft_top_p=torch.tensor(dp))
    if heads is None:
        return art
    h_t, h_d = heads
    dense = (art.layer_map == -1)[:, None]
    head_map = torch.where(dense, -1, (torch.arange(h_t) * h_d // h_t).expand(n_t, h_t)).int()
    return dataclasses.replace(art, head_map=head_map, top_p_head=art.top_p[:, None].expand(n_t, h_t).contiguous())


class Bytes:
    """Bytes one forward must read: weights (the embedding table only as the LM head, when tied) and KV (a
    sliding-window layer reads at most its window)."""

    def __init__(self, model):
        cfg = model.config
        self.weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if not cfg.tie_word_embeddings:  # an untied input embedding reads one row per token, not the table
            self.weights -= model.get_input_embeddings().weight.numel() * 2
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_per_layer_position = 2 * cfg.num_key_value_heads * head_dim * 2
        self.windows = layer_windows(cfg)

    def kv(self, ctx: int, fraction=1.0) -> float:
        """KV bytes of one query at ``ctx`` keys: each layer's visible keys (``min(ctx, window)``) times the share
        it read (``fraction``: one number for every layer, or one per layer)."""
        shares = fraction if isinstance(fraction, (list, tuple)) else [fraction] * len(self.windows)
        return self.kv_per_layer_position * sum(min(ctx, w or ctx) * f for w, f in zip(self.windows, shares))

    def forward(self, ctx: int, kv_fraction=1.0) -> float:
        return self.weights + self.kv(ctx, kv_fraction)

    def draft_phase(self, ctx: int, k: int, sparse_read: float = 1.0) -> float:
        """The draft phase: ``k`` forwards (weights each time), the first reading all ``ctx`` keys, the other
        ``k - 1`` the share ``sparse_read`` (1 for dense drafting; sparse drafting's mean over layers)."""
        return k * self.weights + self.kv(ctx) * (1 + (k - 1) * sparse_read)


@torch.no_grad()
def hf_compiled_ar(model, ids: torch.Tensor, new_tokens: int, chunk: int = 4096) -> dict:
    """transformers' StaticCache + compiled one-token step, greedy; decode tokens/s after warm-up. ``ids``
    ``[B, n]``: B equal-length prompts in one static batch (``bench/throughput.py``).

    Timed twice: feeding each token back on the device and reading them all at the end (HF's best case: its
    ``tokens_per_second``), and reading each token as it comes, as a loop that streams or checks EOS does (and as
    this runtime does, once per step: ``tokens_per_second_read_each``). Frees its cache and CUDA graphs before
    returning; the runtime's own compiled forwards stay."""
    from transformers import StaticCache

    model.set_attn_implementation("sdpa")
    code = None
    try:
        n = ids.shape[1]
        cache = StaticCache(config=model.config, max_cache_len=n + 2 * new_tokens + 16)  # warm-up + 2 timings
        for s in range(0, n - 1, chunk):
            model(input_ids=ids[:, s : min(s + chunk, n - 1)], past_key_values=cache, use_cache=True,
                  logits_to_keep=1)

        def step(tok):
            return model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

        code = step.__code__
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        cur = ids[:, -1:].clone()
        t0 = time.perf_counter()
        for _ in range(4):  # compile, record the CUDA graph, replay once (these tokens extend the context by 4)
            torch.compiler.cudagraph_mark_step_begin()
            cur = compiled(cur).clone()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        times = []
        for read_each in (False, True):
            out = []
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                torch.compiler.cudagraph_mark_step_begin()
                nxt = compiled(cur)
                cur = nxt.clone()
                out.append(int(nxt.view(-1)[0]) if read_each else cur)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t1)
        b = ids.shape[0]  # a batch of equal-length prompts decodes b tokens per step
        return {"tokens_per_second": b * new_tokens / times[0], "step_ms": 1e3 * times[0] / new_tokens,
                "tokens_per_second_read_each": b * new_tokens / times[1], "compile_s": compile_s}
    finally:
        model.set_attn_implementation("specattn")
        if code is not None:
            torch._dynamo.reset_code(code)  # its guards hold the static cache
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
        gc.collect()
        torch.cuda.empty_cache()


def run_ours(rt: SpecAttnRuntime, ids: torch.Tensor, new_tokens: int, k: int, accepted_length: float) -> dict:
    ForcedAcceptance.accepted_length = accepted_length
    warm = rt.generate(ids[0], 2 * (k + 1), k=k, eos_token_id=None)  # capture (first use) + a short warm run
    out = rt.generate(ids[0], new_tokens, k=k, eos_token_id=None)
    s = out.stats
    per_step = 1e3 / s.steps
    kv = sum(s.kv_read_fraction) / len(s.kv_read_fraction)
    store = rt._caches.store
    dkv = s.draft_kv_read_fraction
    return {"tokens_per_second": s.decode_tokens_per_second, "draft_kv_read": sum(dkv) / len(dkv) if dkv else None, "step_ms": s.time_decode * per_step,
            "split_ms": {"draft": s.time_draft * per_step, "select": s.time_select * per_step,
                         "verify": s.time_verify * per_step,
                         "other": (s.time_decode - s.time_draft - s.time_select - s.time_verify) * per_step},
            "measured_accepted_length": s.mean_accepted_length, "kv_read_all_layers": kv, "steps": s.steps,
            "kv_read_per_layer": list(s.kv_read_fraction),
            "kv_bytes": store.nbytes(), "kv_bytes_full": store.nbytes_full(),
            # first use of this (runtime, k) on these caches: allocation, compilation (first time per query
            # length), warm-up and graph capture; 0-ish afterwards
            "capture_s": warm.stats.time_capture, "prefill_s": warm.stats.time_prefill}


@torch.no_grad()
def run_engine(eng: DecodeEngine, ids: list[int], new_tokens: int) -> dict:
    """Capture (first use), prefill (reusing the cached prompt), a short warm run, then ``new_tokens`` more timed,
    continuing it: the runtime's static ``generate`` loop without its bookkeeping (one host read per step)."""
    t0 = time.perf_counter()
    eng.capture()
    t1 = time.perf_counter()
    eng.store.prefill("target", ids[:-1])
    torch.cuda.synchronize()
    t2 = time.perf_counter()

    def go(n: int) -> tuple[float, int, int]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        steps = toks = 0
        while toks < n:
            toks += len(eng.step())
            steps += 1
        return time.perf_counter() - t, steps, toks

    eng.start(len(ids) - 1, ids[-1], ids[-2], seed=0)
    go(2 * (eng.k + 1))  # warm, and past self-speculation's first (dense) drafting round: time the steady state
    eng.times = StepTimes()
    eng.kv_read.zero_()
    elapsed, steps, toks = go(new_tokens)
    per_step, tm = 1e3 / steps, eng.times
    n_layers = eng.target.config.num_hidden_layers
    per_layer = [1.0] * n_layers  # share of keys read (drafts, for self_spec)
    for j, f in zip(eng.plan.sparse_layers, eng.kv_read_sum()):
        per_layer[j] = f / steps
    kv = sum(per_layer) / n_layers
    return {"tokens_per_second": toks / elapsed, "step_ms": elapsed * per_step,
            "split_ms": {"draft": tm.draft * per_step, "select": tm.select * per_step, "verify": tm.verify * per_step,
                         "other": (elapsed - tm.draft - tm.select - tm.verify) * per_step},
            "measured_accepted_length": toks / steps, "kv_read_all_layers": kv, "kv_read_per_layer": per_layer,
            "steps": steps, "kv_bytes": eng.store.nbytes(), "kv_bytes_full": eng.store.nbytes_full(),
            "capture_s": t1 - t0, "prefill_s": t2 - t1}


def self_spec_rows(target, ids: list[int], args, ks: list[int], tb: "Bytes", bw: float, base: dict,
                   want_ar: bool) -> list[dict]:
    """``self_spec`` rows (one per (k in ``ks``, accepted length, density)) and, with ``want_ar``, the ``ar`` row,
    over one set of target-only caches; the caches are freed before returning."""
    ctx = len(ids)
    n = target.config.num_hidden_layers
    capacity = -(-(ctx + 2 * args.new_tokens + 2 * max(args.k) + 16) // 16) * 16
    store = KVStore({"target": target}, capacity)
    fwd = {"target": make_forward(target, compile=args.compile_forwards)}
    ar_floor_ms = 1e3 * tb.forward(ctx) / bw
    rows = []
    if want_ar:
        res = run_engine(DecodeEngine(target, store, SparsePlan(), 0, fwd, graphs=True), ids, args.new_tokens)
        rows.append(base | {"k": None, "accepted_length": None, "density": None, "method": "ar", **res,
                            "floor_ms": ar_floor_ms, "bytes_bound_speedup_over_ar": 1.0})
        print(f"ctx {ctx} ar: {res['tokens_per_second']:.1f} tok/s, step {res['step_ms']:.2f} ms", flush=True)
    dense = args.self_dense_layers
    layers = sparse_candidates(layer_windows(target.config), dense)  # short windows stay dense
    for k in ks:
        plan = self_plan(layers, [args.self_density[0]] * len(layers))
        eng = ForcedSelfAcceptance(target, store, plan, k, fwd, backend="triton", graphs=True,
                                   record_launch=args.self_record_launch)
        for acc, d in zip(args.self_accepted_length, args.self_density):
            eng.accepted_length = acc
            eng.sel_p.fill_(d)  # a device buffer the captured select phase reads: no recapture
            res = run_engine(eng, ids, args.new_tokens)
            kv = res["kv_read_all_layers"]
            # per step: k drafting forwards (weights + the drafts' KV share) and one dense verification
            floor_ms = 1e3 * (k * tb.forward(ctx, res["kv_read_per_layer"]) + tb.forward(ctx)) / bw
            rows.append(base | {"k": k, "accepted_length": acc, "density": d, "method": "self_spec", **res,
                                "dense_layers": dense, "record_launch": args.self_record_launch,
                                "floor_ms": floor_ms,
                                "bytes_bound_speedup_over_ar": acc / floor_ms * ar_floor_ms})
            print(f"ctx {ctx} self_spec k {k} acc {acc} density {d}: {res['tokens_per_second']:.1f} tok/s, step "
                  f"{res['step_ms']:.2f} ms (floor {floor_ms:.2f}) KV read {kv:.3f} split {res['split_ms']}",
                  flush=True)
        del eng
    del store, fwd
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), default="llama2")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS[:4]),
                    help="which methods to run (default: all but self_spec)")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--accepted-length", type=float, nargs="+", default=[2.0, 3.0],
                    help="forced mean tokens per verification (random weights cannot show acceptance)")
    ap.add_argument("--density", type=float, nargs="+", default=[0.2, 0.4],
                    help="forced p on every sparse layer (random weights cannot show sparsity)")
    ap.add_argument("--draft-density", type=float, default=0.1,
                    help="specattn_sd: forced p of the draft's own sparse reading (every draft layer but the first)")
    ap.add_argument("--self-accepted-length", type=float, nargs="+", default=[3.0, 3.5],
                    help="self_spec: forced mean tokens per step, paired with --self-density")
    ap.add_argument("--self-density", type=float, nargs="+", default=[0.10, 0.05],
                    help="self_spec: forced p of the drafts' sparse layers, paired with --self-accepted-length")
    ap.add_argument("--self-dense-layers", type=int, default=2, help="self_spec: first layers drafting densely")
    ap.add_argument("--self-record-launch", type=json.loads, default=None,
                    help='self_spec: Triton launch of the recording verification attention, JSON, e.g. '
                         '\'{"num_warps": 8, "num_stages": 3}\' (bench/self_record_sweep.py measures them)')
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile the model forwards of every engine row; auto: as the runtime does (on, but "
                         "off for models with attention variants until their compiled GPU tests pass)")
    ap.add_argument("--skip-hf", action="store_true", help="leave out the transformers baseline (debugging only)")
    ap.add_argument("--out", default="bench/e2e.json")
    args = ap.parse_args()
    if len(args.self_accepted_length) != len(args.self_density):
        ap.error("--self-accepted-length and --self-density are pairs: give them the same number of values")
    want = set(args.methods) - ({"hf_compiled_ar"} if args.skip_hf else set())
    spec = bool(want & SPEC_METHODS)
    t_cfg, d_cfg = PAIRS[args.pair]
    max_pos = max(args.contexts) + 4 * args.new_tokens + max(args.k) + 64
    torch.manual_seed(0)
    target = build(t_cfg, max_pos)
    draft = build(d_cfg, max_pos) if spec else None
    variants = {f for m in (target, draft) if m is not None for f in model_features(m.config)}
    args.compile_forwards = not variants if args.compile == "auto" else args.compile == "on"
    n_t = target.config.num_hidden_layers
    bw = copy_bandwidth("cuda")
    tb = Bytes(target)
    db = Bytes(draft) if spec else None
    meta = {"pair": args.pair, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "copy_bandwidth_GBs": bw / 1e9, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "forced": "acceptance length and per-layer density are forced inputs (random weights)", **vars(args)}
    rows: list[dict] = []

    def save():
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for ctx in args.contexts:
        ids = torch.randint(0, t_cfg["vocab_size"], (1, ctx), device="cuda")
        ar_floor_ms = 1e3 * tb.forward(ctx) / bw
        base = {"pair": args.pair, "context": ctx}
        if spec:
            n_d = draft.config.num_hidden_layers
            windows = dict(target_dense=dense_window_layers(target), draft_dense=dense_window_layers(draft))
            rts = {"spec_dense": SpecAttnRuntime(artifact_for(n_t, n_d, 1.0), draft, target,
                                                 compile=args.compile_forwards)}
            if "specattn" in want:
                for d in args.density:
                    rts[("specattn", d)] = SpecAttnRuntime(artifact_for(n_t, n_d, d, **windows), draft, target,
                                                           compile=args.compile_forwards)
            if "specattn_head" in want:
                heads = (target.config.num_key_value_heads, draft.config.num_key_value_heads)
                for d in args.density:
                    rts[("specattn_head", d)] = SpecAttnRuntime(artifact_for(n_t, n_d, d, heads=heads, **windows),
                                                                draft, target, compile=args.compile_forwards)
            if "specattn_sd" in want:
                for d in args.density:
                    art = artifact_for(n_t, n_d, d, draft_density=args.draft_density, **windows)
                    rts[("specattn_sd", d)] = SpecAttnRuntime(art, draft, target, compile=args.compile_forwards)
            first = rts["spec_dense"]
            for rt in rts.values():
                rt.engine_class = ForcedAcceptance
                rt.share_caches_with(first)
            if "ar" in want:
                res = run_ours(first, ids, args.new_tokens, 0, 1.0)
                rows.append(base | {"k": None, "accepted_length": None, "density": None, "method": "ar", **res,
                                    "floor_ms": ar_floor_ms, "bytes_bound_speedup_over_ar": 1.0})
            if "spec_dense" not in want:
                rts.pop("spec_dense")
            for k in args.k:
                for acc in args.accepted_length:
                    for key, rt in rts.items():
                        res = run_ours(rt, ids, args.new_tokens, k, acc)
                        draft_floor_ms = 1e3 * db.draft_phase(ctx, k, res["draft_kv_read"] or 1.0) / bw
                        floor_ms = draft_floor_ms + 1e3 * tb.forward(ctx, res["kv_read_per_layer"]) / bw
                        method, density = (key, None) if key == "spec_dense" else key
                        rows.append(base | {"k": k, "accepted_length": acc, "density": density, "method": method,
                                            **res, "draft_floor_ms": draft_floor_ms,
                                            "draft_density": args.draft_density if method == "specattn_sd" else None,
                                            "floor_ms": floor_ms,
                                            "bytes_bound_speedup_over_ar": acc / floor_ms * ar_floor_ms})
                        print(f"ctx {ctx} k {k} acc {acc} {key}: {res['tokens_per_second']:.1f} tok/s, step "
                              f"{res['step_ms']:.2f} ms (floor {floor_ms:.2f}) split {res['split_ms']}", flush=True)
                    save()
            first.release_caches()
            for rt in rts.values():
                rt.release_caches()
            del rts, first
        if "self_spec" in want or ("ar" in want and not spec):
            ks = args.k if "self_spec" in want else []
            rows += self_spec_rows(target, ids[0].tolist(), args, ks, tb, bw, base, want_ar="ar" in want and not spec)
            save()
        if "hf_compiled_ar" in want:
            hf = hf_compiled_ar(target, ids, args.new_tokens)
            rows.append(base | {"k": None, "accepted_length": None, "density": None, "method": "hf_compiled_ar", **hf,
                                "floor_ms": ar_floor_ms, "bytes_bound_speedup_over_ar": 1.0})
            print(f"ctx {ctx} hf_compiled_ar: {hf['tokens_per_second']:.1f} tok/s", flush=True)
        hf_tps = next((r["tokens_per_second"] for r in rows if r["context"] == ctx and r["method"] == "hf_compiled_ar"),
                      None)
        for r in rows:
            if r["context"] == ctx:
                r["speedup_over_hf"] = r["tokens_per_second"] / hf_tps if hf_tps else None
                r["floor_fraction"] = r["floor_ms"] / r["step_ms"]  # its speed over its bytes-bound speed
                # the share of its bytes-bound ratio over AR that its measured ratio over hf_compiled_ar reaches
                r["bound_ratio_fraction"] = r["speedup_over_hf"] / r["bytes_bound_speedup_over_ar"] if hf_tps else None
        save()
        del ids
        gc.collect()
        torch.cuda.empty_cache()
    print_table(rows)
    print(f"wrote {args.out}")


def print_table(rows: list[dict]) -> None:
    print("\n| context | method | k | acc. len (forced) | density (forced) | KV read | draft KV read | tok/s | x HF | "
          "step ms | floor ms | floor/step | bytes-bound x AR | draft / select / verify / other ms | draft floor ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        split = r.get("split_ms")
        split_s = " / ".join(f"{split[p]:.2f}" for p in ("draft", "select", "verify", "other")) if split else "-"
        kv = r.get("kv_read_all_layers")
        x_hf = r.get("speedup_over_hf")
        dkv, dfl = r.get("draft_kv_read"), r.get("draft_floor_ms")
        print(f"| {r['context']} | {r['method']} | {r['k'] or '-'} | {r['accepted_length'] or '-'} | "
              f"{r['density'] or '-'} | {f'{kv:.3f}' if kv is not None else '-'} | "
              f"{f'{dkv:.3f}' if dkv is not None else '-'} | {r['tokens_per_second']:.1f} | "
              f"{f'{x_hf:.2f}' if x_hf else '-'} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | "
              f"{r['floor_ms'] / r['step_ms']:.2f} | {r['bytes_bound_speedup_over_ar']:.2f} | {split_s} | "
              f"{f'{dfl:.2f}' if dfl else '-'} |")


if __name__ == "__main__":
    main()
