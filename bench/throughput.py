"""Batched decoding throughput on a GPU: B sequences of one context length, every method in one process.

Methods (``method`` of each JSON row), all over one paged KV pool per (batch, context), prefilled once:

- ``ar``: the batched engine with ``k = 0`` (the target alone, one token per sequence per step);
- ``spec_dense``: draft-model speculation, every target layer verified densely;
- ``specattn`` / ``specattn_head``: sparse verification, per layer / per KV head;
- ``specattn_sd``: ``specattn`` with sparse drafting (every draft layer but the first reads, after each step's
  first dense draft forward, the top-p chunks of its attention at ``--draft-density``);
- ``self_spec``: self-speculation (the target drafts over the chunks its last dense verification attended to);
- ``hf_compiled_batch``: transformers' ``StaticCache`` of batch B with the one-token step under
  ``torch.compile(mode="reduce-overhead")``, equal-length prompts prefilled in chunks (out of memory: said so);
- ``hf_batch``: transformers' continuous batching (``generate_batch``, attention ``sdpa`` -> ``paged|sdpa``).

Random bf16 weights (bench/e2e.py's architectures), so acceptance and density are **forced** as in bench/e2e.py:
the accept phase emits a fixed cycle of accepted counts averaging ``--accepted-length`` per sequence, and every
sparse layer's p is ``--density`` (rows report the KV share actually read). Everything else runs for real: paged
attention through page tables, per-sequence recording and selection, one host read per step.

Every row has its bytes floor (``floor_ms``: what one step must read over the measured copy bandwidth; weights once
per forward, each sequence's KV at the share its attention read) and ``floor_fraction`` = floor / measured step.
The prompt is prefilled once and its pages copied to every sequence (decoding reads the same bytes either way).
Models with sliding windows (``--pair gemma3``) keep their window layers in ring pages, one set per sequence, as
``generate_batch`` does; short windows stay dense in the forced artifacts (bench/e2e.py).

    python3 bench/throughput.py --pair llama3 --batches 1 16 --contexts 8192 32768 --out bench/throughput_llama3_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ itself is sys.path[0]: replace it (its kernels.py would shadow the `kernels` package
# that transformers imports where it is installed)
sys.path[0:1] = [str(ROOT)] if Path(sys.path[0]).resolve() == ROOT / "bench" else [str(ROOT), sys.path[0]]

from bench.e2e import PAIRS, Bytes, artifact_for, build, dense_window_layers, forced_cycle, hf_compiled_ar  # noqa: E402
from bench.kernels import copy_bandwidth  # noqa: E402
from specattn_runtime import SpecAttnRuntime  # noqa: E402
from specattn_runtime.engine import SparsePlan, make_forward, self_plan  # noqa: E402
from specattn_runtime.engine.batch import BatchEngine  # noqa: E402
from specattn_runtime.engine.graphs import BatchGraphs  # noqa: E402
from specattn_runtime.engine.pages import PagedKVPool, bytes_per_page, pool_ring_slots, ring_pool_bytes  # noqa: E402
from specattn_runtime.engine.prefill import prefill_into_pool  # noqa: E402

METHODS = ("ar", "spec_dense", "specattn", "specattn_head", "specattn_sd", "self_spec", "hf_compiled_batch",
           "hf_batch")
ENGINE_METHODS = METHODS[:6]


class ForcedBatchAcceptance(BatchEngine):
    """Accepted counts forced to a fixed cycle averaging ``accepted_length - 1`` drafts per sequence and step (each
    sequence at its own point of the cycle, as real sequences would be); the target's tokens are emitted."""

    CYCLE = 64

    def __init__(self, *args, accepted_length: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = torch.tensor(forced_cycle(accepted_length, self.k, self.CYCLE), dtype=torch.int64,
                                     device=self.device)

    def _accept(self, b: int):
        phase = (self.step_no[:b, 0] + torch.arange(b, device=self.device) * 7) % self.CYCLE
        return self.schedule.index_select(0, phase), self.tlogits[:b].argmax(-1)


def filled_pool(models: dict, batch: int, ctx: int, extra: int, vocab: int):
    """A pool holding ``batch`` copies of one random ``ctx``-token prompt (both models), ``extra`` positions spare
    per sequence (window layers: in rings). Returns (pool, pages per sequence, ring pages per sequence, prompt)."""
    page = 16
    per_seq = -(-(ctx + extra) // page)
    pool = PagedKVPool(models, batch * per_seq + 1, page, ring_sequences=batch)
    pages = [pool.allocator.allocate(per_seq) for _ in range(batch)]
    rings = [pool.ring_allocator.allocate(pool.ring_pages) if pool.ring_slots else [] for _ in range(batch)]
    prompt = torch.randint(0, vocab, (ctx,)).tolist()
    for role in models:
        prefill_into_pool(pool, role, pages[0], prompt[:-1], ring_pages=rings[0])
        for j, (k, v) in enumerate(pool.kv[role]):
            ids = rings if pool.ring[role][j] else pages  # a window layer's ring pages, or the sequence's pages
            src = torch.tensor(ids[0], device=pool.device)
            for p in ids[1:]:
                dst = torch.tensor(p, device=pool.device)
                k.index_copy_(0, dst, k.index_select(0, src))
                v.index_copy_(0, dst, v.index_select(0, src))
    torch.cuda.synchronize()
    return pool, pages, rings, prompt


@torch.no_grad()
def run_batched(eng: BatchEngine, pages: list[list[int]], rings: list[list[int]], prompt: list[int],
                steps: int) -> dict:
    """Load every slot with the prompt, warm up (captures the bucket), then time ``steps`` steps."""
    b = len(pages)
    graphs = BatchGraphs(eng)

    def load():
        for i, (p, r) in enumerate(zip(pages, rings)):
            eng.load_slot(i, p, len(prompt) - 1, prompt[-1], prompt[-2], ring_pages=r)

    t0 = time.perf_counter()
    load()
    for _ in range(3):  # capture, then past self-speculation's first (dense) drafting round
        graphs.step(b)
    capture_s = time.perf_counter() - t0
    load()
    for _ in range(2):
        graphs.step(b)
    graphs.times.__init__()
    eng.kv_read.zero_()
    eng.draft_kv_read.zero_()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    toks = 0
    for _ in range(steps):
        toks += sum(len(o) for o in graphs.step(b))
    elapsed = time.perf_counter() - t1
    per_step, tm = 1e3 / steps, graphs.times
    n_layers = eng.target.config.num_hidden_layers
    per_layer = [1.0] * n_layers  # share of keys read, mean over sequences
    for j, f in zip(eng.plan.sparse_layers, (eng.kv_read[:b].sum(0) / steps / b).tolist()):
        per_layer[j] = f
    kv = sum(per_layer) / n_layers
    n_draft = len(eng.pool.kv["draft"]) if "draft" in eng.pool.kv else 0
    dsparse = (eng.draft_kv_read[:b].sum(0) / steps / b).tolist() if eng.plan.draft_sparse_layers else []
    draft_kv = (n_draft - len(dsparse) + sum(dsparse)) / n_draft if n_draft else None
    return {"tokens_per_second": toks / elapsed, "step_ms": elapsed * per_step,
            "split_ms": {"draft": tm.draft * per_step, "select": tm.select * per_step, "verify": tm.verify * per_step,
                         "accept": tm.accept * per_step,
                         "other": (elapsed - tm.draft - tm.select - tm.verify - tm.accept) * per_step},
            "measured_accepted_length": toks / steps / b, "kv_read_all_layers": kv, "kv_read_per_layer": per_layer,
            "draft_kv_read": draft_kv, "steps": steps, "kv_bytes": eng.pool.nbytes(), "capture_s": capture_s}


def hf_compiled_batch(model, batch: int, ctx: int, new_tokens: int) -> dict:
    """transformers' StaticCache of batch ``batch`` + the compiled one-token step (bench/e2e.py's, on B prompts),
    reading each step's tokens as this runtime does."""
    try:
        ids = torch.randint(0, model.config.vocab_size, (batch, ctx), device="cuda")
        res = hf_compiled_ar(model, ids, new_tokens, chunk=max(1, 4096 // batch))
        return {"tokens_per_second": res["tokens_per_second_read_each"],
                "step_ms": 1e3 * batch / res["tokens_per_second_read_each"], "capture_s": res["compile_s"]}
    except torch.OutOfMemoryError as e:
        gc.collect()
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(e)[:120]}"}


@torch.no_grad()
def hf_batch(model, batch: int, ctx: int, new_tokens: int) -> dict:
    """transformers' continuous batching: decode throughput ``B (N - 1) / (T(N) - T(1))`` after a warm-up call."""
    from transformers import GenerationConfig

    model.config._attn_implementation = "sdpa"
    try:
        ids = [torch.randint(0, model.config.vocab_size, (ctx,)).tolist() for _ in range(batch)]

        def run(n):
            cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate_batch(ids, generation_config=cfg)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        run(2)
        t1, tn = run(1), run(new_tokens)
        return {"tokens_per_second": batch * (new_tokens - 1) / (tn - t1),
                "step_ms": 1e3 * (tn - t1) / (new_tokens - 1)}
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e)[:120]}"}
    finally:
        model.set_attn_implementation("specattn")
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), default="llama3")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(ENGINE_METHODS) + ["hf_compiled_batch"])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--accepted-length", type=float, default=3.0, help="forced mean tokens per sequence and step")
    ap.add_argument("--density", type=float, default=0.4, help="forced p of every sparse verification layer")
    ap.add_argument("--draft-density", type=float, default=0.1,
                    help="specattn_sd: forced p of the draft's own sparse reading (every draft layer but the first)")
    ap.add_argument("--self-accepted-length", type=float, default=3.5)
    ap.add_argument("--self-density", type=float, default=0.05, help="self_spec: forced p of the drafting layers")
    ap.add_argument("--steps", type=int, default=24, help="timed steps per row")
    ap.add_argument("--hf-at", nargs="+", default=None,
                    help="BxCTX points for the hf_* methods (default: every point)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each model forward (inductor fuses the small ops; costs compile time per "
                         "batch size)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev_name = torch.cuda.get_device_name()
    out = args.out or f"bench/throughput_{args.pair}_{dev_name.split()[-1].lower()}.json"
    want = set(args.methods)
    t_cfg, d_cfg = PAIRS[args.pair]
    max_pos = max(args.contexts) + 1024
    torch.manual_seed(0)
    target = build(t_cfg, max_pos)
    spec = bool(want & {"spec_dense", "specattn", "specattn_head", "specattn_sd"})
    draft = build(d_cfg, max_pos) if spec else None
    models = {"target": target, **({"draft": draft} if spec else {})}
    bw = copy_bandwidth("cuda")
    tb, db = Bytes(target), (Bytes(draft) if spec else None)
    n_t = target.config.num_hidden_layers
    fwd = {role: make_forward(m, args.compile) for role, m in models.items()}
    plans = {"ar": (SparsePlan(), 0, "draft", 1.0)}
    if spec:
        n_d = draft.config.num_hidden_layers
        windows = dict(target_dense=dense_window_layers(target), draft_dense=dense_window_layers(draft))
        plans["spec_dense"] = (SpecAttnRuntime(artifact_for(n_t, n_d, 1.0), draft, target).plan, args.k, "draft",
                               args.accepted_length)
        plans["specattn"] = (SpecAttnRuntime(artifact_for(n_t, n_d, args.density, **windows), draft, target).plan,
                             args.k, "draft", args.accepted_length)
        heads = (target.config.num_key_value_heads, draft.config.num_key_value_heads)
        plans["specattn_head"] = (SpecAttnRuntime(artifact_for(n_t, n_d, args.density, heads=heads, **windows),
                                                  draft, target).plan, args.k, "draft", args.accepted_length)
        sd = artifact_for(n_t, n_d, args.density, draft_density=args.draft_density, **windows)
        plans["specattn_sd"] = (SpecAttnRuntime(sd, draft, target).plan, args.k, "draft", args.accepted_length)
    self_layers = [j for j in range(2, n_t) if j not in dense_window_layers(target)]
    plans["self_spec"] = (self_plan(self_layers, [args.self_density] * len(self_layers)), args.k, "self",
                          args.self_accepted_length)
    meta = {"pair": args.pair, "device": dev_name, "torch": torch.__version__, "copy_bandwidth_GBs": bw / 1e9,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "forced": "acceptance length and per-layer density are forced inputs (random weights)", **vars(args)}
    rows: list[dict] = []

    def save():
        Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for ctx in args.contexts:
        for b in args.batches:
            base = {"pair": args.pair, "batch": b, "context": ctx}
            ar_floor_ms = 1e3 * (tb.weights + b * tb.kv(ctx)) / bw
            ring = pool_ring_slots(models, 16)
            need = b * -(-(ctx + (args.steps + 8) * (args.k + 1) + 32) // 16) * bytes_per_page(models, 16, ring) \
                + ring_pool_bytes(models, ring, b, 16)
            free = torch.cuda.mem_get_info()[0]
            if need > 0.85 * free:
                print(f"{b} x {ctx}: the pool needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free: skipped", flush=True)
                rows.append(base | {"method": "all", "error": "pool does not fit"})
                continue
            pool, pages, rings, prompt = filled_pool(models, b, ctx, (args.steps + 8) * (args.k + 1) + 32,
                                                     t_cfg["vocab_size"])
            for method in [m for m in ENGINE_METHODS if m in want]:
                plan, k, mode, acc = plans[method]
                eng = ForcedBatchAcceptance(target, pool, plan, k, fwd, max_batch=b, max_pages=len(pages[0]),
                                            mode=mode, backend="triton", accepted_length=acc)
                res = run_batched(eng, pages, rings, prompt, args.steps)
                kv, per_layer, draft_floor = res["kv_read_all_layers"], res["kv_read_per_layer"], None
                if method == "ar":
                    floor = ar_floor_ms
                elif mode == "self":  # k sparse drafting forwards and one dense verification
                    floor = 1e3 * (k * (tb.weights + b * tb.kv(ctx, per_layer)) + tb.weights + b * tb.kv(ctx)) / bw
                else:  # k draft forwards (the later k - 1 at the share they read) and one verification
                    draft_floor = 1e3 * (k * db.weights + b * db.kv(ctx) * (1 + (k - 1) * res["draft_kv_read"])) / bw
                    floor = draft_floor + 1e3 * (tb.weights + b * tb.kv(ctx, per_layer)) / bw
                row = base | {"method": method, "k": k or None, "accepted_length": acc if k else None,
                              "density": (args.self_density if mode == "self" else args.density)
                              if method not in ("ar", "spec_dense") else None,
                              "draft_density": args.draft_density if method == "specattn_sd" else None, **res,
                              "floor_ms": floor, "draft_floor_ms": draft_floor,
                              "floor_fraction": floor / res["step_ms"],
                              "bytes_bound_speedup_over_ar": (acc if k else 1.0) / floor * ar_floor_ms}
                rows.append(row)
                print(f"{b} x {ctx} {method}: {res['tokens_per_second']:.1f} tok/s, step {res['step_ms']:.2f} ms "
                      f"(floor {floor:.2f}, {row['floor_fraction']:.2f}), KV read {kv:.3f}, split "
                      f"{ {p: round(v, 2) for p, v in res['split_ms'].items()} }, capture {res['capture_s']:.1f} s",
                      flush=True)
                del eng
                save()
            del pool, pages, rings
            gc.collect()
            torch.cuda.empty_cache()
            if args.hf_at is None or f"{b}x{ctx}" in args.hf_at:
                for method, fn in (("hf_compiled_batch", hf_compiled_batch), ("hf_batch", hf_batch)):
                    if method in want:
                        res = fn(target, b, ctx, 16 if method == "hf_batch" else args.steps)
                        rows.append(base | {"method": method, **res, "floor_ms": ar_floor_ms,
                                            "floor_fraction": ar_floor_ms / res["step_ms"] if "step_ms" in res
                                            else None})
                        print(f"{b} x {ctx} {method}: {res}", flush=True)
                        save()
            ar = next((r for r in rows if r.get("method") == "ar" and r["batch"] == b and r["context"] == ctx), None)
            for r in rows:
                if ar and r["batch"] == b and r["context"] == ctx and "tokens_per_second" in r:
                    r["speedup_over_ar"] = r["tokens_per_second"] / ar["tokens_per_second"]
            save()
    print_table(rows)
    print(f"wrote {out}")


def print_table(rows: list[dict]) -> None:
    print("\n| batch x context | method | tok/s | x ar | step ms | floor ms | floor/step | KV read | draft KV read | "
          "bound x ar | draft / select / verify / accept / other ms | draft floor ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_second" not in r:
            print(f"| {r['batch']} x {r['context']} | {r['method']} | {r.get('error')} | | | | | | | | | |")
            continue
        split = r.get("split_ms")
        s = " / ".join(f"{split[p]:.2f}" for p in ("draft", "select", "verify", "accept", "other")) if split else "-"
        kv = r.get("kv_read_all_layers")
        print(f"| {r['batch']} x {r['context']} | {r['method']} | {r['tokens_per_second']:.1f} | "
              f"{r.get('speedup_over_ar', 0):.2f} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | "
              f"{r['floor_ms'] / r['step_ms']:.2f} | {f'{kv:.3f}' if kv is not None else '-'} | "
              f"{f'{dkv:.3f}' if (dkv := r.get('draft_kv_read')) is not None else '-'} | "
              f"{r.get('bytes_bound_speedup_over_ar', 1.0):.2f} | {s} | "
              f"{f'{dfl:.2f}' if (dfl := r.get('draft_floor_ms')) else '-'} |")


if __name__ == "__main__":
    main()
