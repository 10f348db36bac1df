"""Real accepted length on the CPU: dense vs SpecAttn verification, dense vs sparse drafting (issue 24).

Greedy generation after Austen windows (the evaluation text, :func:`pipelines.eval_text.evaluation_windows`: each
window starts as the model's inputs do), one process, the same model objects for every method:

- ``dense``: dense verification (every target p = 1, so every layer takes the exact dense path) and dense
  drafting: the target's own greedy tokens, the reference the others are compared with;
- ``specattn_head``: SpecAttn verification with the artifact's per-KV-head p, dense drafting;
- ``specattn_head_sd_first``: the same with sparse drafting (the artifact's ``draft_top_p``), the target's
  selection from each step's dense first draft forward;
- ``specattn_head_sd_all``: sparse drafting, the target's selection from every draft forward.

Per method, window length and k: mean accepted length (tokens per verification), target KV read (mean over all
layers, dense ones reading everything), the draft's KV read (forwards after each step's first, and all k
forwards), decode tok/s (informational: a 2-core CPU, eager loop) and how many leading tokens equal ``dense``'s.

    python bench/acceptance_cpu.py --preset qwen-coder --artifact artifacts/qwen-coder/latest.safetensors \\
        --lengths 2048 6144 --windows 1 --out bench/acceptance_qwen_coder_cpu.json
    python bench/acceptance_cpu.py --preset quick --artifact artifacts/quick/latest.safetensors --lengths 512 \\
        --new-tokens 16 --out /tmp/acceptance_quick.json   # smoke check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

# Run as a file, the script's folder comes first on sys.path, and bench/kernels.py would then shadow the
# ``kernels`` package transformers probes for: put the repository root there instead.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipelines.eval_text import austen_novels, evaluation_windows  # noqa: E402
from pipelines.presets import PAIRS  # noqa: E402
from specattn_runtime import SpecAttnRuntime  # noqa: E402

# name -> (dense verification, SpecAttnRuntime kwargs)
METHODS = {
    "dense": (True, dict(sparse_draft=False)),
    "specattn_head": (False, dict(per_head=True, sparse_draft=False)),
    "specattn_head_sd_first": (False, dict(per_head=True, sparse_draft=True, sparse_draft_guidance="first")),
    "specattn_head_sd_all": (False, dict(per_head=True, sparse_draft=True, sparse_draft_guidance="all")),
}
LABELS = {"dense": "(a) dense verification, dense drafting",
          "specattn_head": "(b) SpecAttn per head, dense drafting",
          "specattn_head_sd_first": "(c) SpecAttn per head, sparse drafting (guidance first)",
          "specattn_head_sd_all": "(d) SpecAttn per head, sparse drafting (guidance all)"}


def runtimes(base: SpecAttnRuntime, engine: str) -> dict[str, SpecAttnRuntime]:
    """One runtime per method over ``base``'s model objects (the static engine: over one set of caches)."""
    art = base.artifact
    dense_art = dataclasses.replace(art, top_p=torch.ones_like(art.top_p),
                                    top_p_head=None if art.top_p_head is None else torch.ones_like(art.top_p_head))
    out = {}
    for name, (dense, kw) in METHODS.items():
        rt = SpecAttnRuntime(dense_art if dense else art, base.draft, base.target, base.tokenizer, engine=engine,
                             **kw)
        if engine == "static" and out:
            rt.share_caches_with(next(iter(out.values())))
        out[name] = rt
    return out


def leading_matches(a: list[int], b: list[int]) -> int:
    """Tokens equal before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_one(rt: SpecAttnRuntime, ids: list[int], new_tokens: int, k: int) -> dict:
    out = rt.generate(ids, new_tokens, k=k, temperature=0.0, eos_token_id=None)
    s = out.stats
    row = {"tokens": out.tokens, **s.summary(), "accepted": s.accepted, "accepted_hist": s.accepted_hist,
           "kv_read_per_layer": s.kv_read_fraction, "draft_kv_read_per_layer": s.draft_kv_read_fraction}
    if row["draft_kv_read_mean"] is not None:  # forward 0 reads everything, forwards 1 .. k - 1 their selection
        row["draft_kv_read_all_forwards"] = (1 + (k - 1) * row["draft_kv_read_mean"]) / k
    return row


def aggregate(rows: list[dict]) -> dict:
    """Over windows: accepted length and reads weighted by steps, tok/s over the summed decode time."""
    steps = sum(r["steps"] for r in rows)

    def weighted(key: str) -> float | None:
        return None if rows[0].get(key) is None else sum(r[key] * r["steps"] for r in rows) / steps

    decode_s = sum(r["new_tokens"] / r["decode_tokens_per_second"] for r in rows)
    return {"windows": len(rows), "steps": steps,
            "mean_accepted_length": (sum(r["accepted"] for r in rows) + steps) / steps,
            "kv_read_mean": weighted("kv_read_mean"), "draft_kv_read_mean": weighted("draft_kv_read_mean"),
            "draft_kv_read_all_forwards": weighted("draft_kv_read_all_forwards"),
            "decode_tokens_per_second": sum(r["new_tokens"] for r in rows) / decode_s,
            "matches_dense": [r["matches_dense"] for r in rows], "equal_dense": all(r["equal_dense"] for r in rows),
            "matches_ar": [r["matches_ar"] for r in rows] if "matches_ar" in rows[0] else None}


def table(summary: list[dict], new_tokens: int) -> str:
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = ["| context | k | method | acc. len (tokens / step) | target KV read (all layers) | draft KV read, "
             "forwards 2..k | draft KV read, all k forwards | decode tok/s | leading tokens = (a) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(summary, key=lambda r: (r["length"], r["k"])):  # stable: methods keep their order
        counts = lambda xs: " / ".join(str(x) for x in xs)  # noqa: E731
        m = (f"{'yes' if r['equal_dense'] else 'no'}: {counts(r['matches_dense'])} of {new_tokens}"
             if r["method"] != "dense" else "reference" if r["matches_ar"] is None else
             f"reference; = the target alone for {counts(r['matches_ar'])} of {new_tokens}")
        lines.append(f"| {r['length']:,} | {r['k']} | {LABELS[r['method']]} | {r['mean_accepted_length']:.2f} | "
                     f"{pct(r['kv_read_mean'])} | {pct(r['draft_kv_read_mean'])} | "
                     f"{pct(r['draft_kv_read_all_forwards'])} | {r['decode_tokens_per_second']:.2f} | {m} |")
    return "\n".join(lines)


def write(args, base: SpecAttnRuntime, summary: list[dict], runs: list[dict], ar: dict, t0: float) -> str:
    """Write the JSON (``args.out``) so far; returns the markdown table."""
    md = table(summary, args.new_tokens)
    art = base.artifact
    meta = {"host": platform.node(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "artifact": str(args.artifact),
            "artifact_fingerprint": art.metadata.get("input_fingerprint"),
            "draft_top_p": None if art.draft_top_p is None else art.draft_top_p.tolist(),
            "target_dtype": args.dtype, "draft_dtype": "float32", "wall_s": time.perf_counter() - t0, **vars(args)}
    ar_rows = [{"length": n, "window": w, "tokens": t} for (n, w), t in ar.items()]
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs, "target_alone": ar_rows,
                                          "table": md}, indent=1))
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen-coder", choices=sorted(PAIRS))
    ap.add_argument("--artifact", default=None, help="default: artifacts/<preset>/latest.safetensors")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 6144], help="prompt (window) tokens")
    ap.add_argument("--windows", type=int, nargs="+", default=[1],
                    help="windows per length (one value for all, or one per length)")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the target's dtype (the draft stays float32: it makes every selection)")
    ap.add_argument("--engine", default="eager", choices=["eager", "static"])
    ap.add_argument("--ar", action="store_true",
                    help="also decode the target alone (k = 0) per window and compare (a) with it")
    ap.add_argument("--out", default="bench/acceptance_qwen_coder_cpu.json")
    args = ap.parse_args()
    if "dense" not in args.methods:
        args.methods.insert(0, "dense")  # the reference every method is compared with
    n_windows = args.windows * len(args.lengths) if len(args.windows) == 1 else args.windows
    if len(n_windows) != len(args.lengths):
        raise SystemExit("--windows takes one value, or one per --lengths value")
    artifact = args.artifact = args.artifact or f"artifacts/{args.preset}/latest.safetensors"
    draft_dir, target_dir = PAIRS[args.preset].ensure()
    t0 = time.perf_counter()
    base = SpecAttnRuntime.from_artifact(artifact, draft=draft_dir, target=target_dir, engine=args.engine)
    base.target.to(getattr(torch, args.dtype))
    rts = {m: rt for m, rt in runtimes(base, args.engine).items() if m in args.methods}
    print(f"models loaded in {time.perf_counter() - t0:.1f} s; draft_top_p = {base.artifact.draft_top_p}",
          file=sys.stderr, flush=True)
    books = austen_novels()
    runs, summary, ar = [], [], {}
    for length, nw in zip(args.lengths, n_windows):
        windows, labels, _ = evaluation_windows(books, base.tokenizer, length, nw)
        for k in args.k:
            for m in args.methods:  # first calls pay one-off costs (kernel set-up, the static engine's caches)
                rts[m].generate(windows[0, :64].tolist(), 2, k=k, eos_token_id=None)
            per_method: dict[str, list[dict]] = {m: [] for m in args.methods}
            for ids, label in zip(windows.tolist(), labels):
                ref = None
                for m in args.methods:
                    t1 = time.perf_counter()
                    row = run_one(rts[m], ids, args.new_tokens, k)
                    ref = row["tokens"] if m == "dense" else ref
                    row |= {"method": m, "length": length, "k": k, "window": label, "wall_s": time.perf_counter() - t1,
                            "matches_dense": leading_matches(row["tokens"], ref), "equal_dense": row["tokens"] == ref}
                    runs.append(row)
                    per_method[m].append(row)
                    print(f"{length} k={k} {label} {m}: acc.len {row['mean_accepted_length']:.3f}, target KV read "
                          f"{row['kv_read_mean']:.3f}, draft KV read {row['draft_kv_read_mean']}, "
                          f"= dense for {row['matches_dense']} tokens, {row['wall_s']:.1f} s", file=sys.stderr,
                          flush=True)
            if args.ar:
                for row in per_method["dense"]:
                    key = (length, row["window"])
                    if key not in ar:  # the target's own greedy decoding, once per window
                        ar[key] = rts["dense"].generate(windows[labels.index(row["window"])].tolist(),
                                                        args.new_tokens, k=0, eos_token_id=None).tokens
                    row["matches_ar"] = leading_matches(row["tokens"], ar[key])
                    print(f"{length} {row['window']} k={k}: (a) = the target alone for {row['matches_ar']} tokens",
                          file=sys.stderr, flush=True)
            summary += [{"method": m, "length": length, "k": k, **aggregate(rows)} for m, rows in per_method.items()]
            write(args, base, summary, runs, ar, t0)  # after every block: a cut run keeps what it measured
    md = write(args, base, summary, runs, ar, t0)
    print(md)


if __name__ == "__main__":
    main()
