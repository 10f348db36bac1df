"""Self-speculation on real weights (CPU): acceptance vs the KV share the sparse draft reads, per drafting method.

The shipped SmolLM2-135M drafts for itself on book text (the Austen novels, or ``--text``), measured
teacher-forced (:mod:`pipelines.self_tuning`: each block of ``k`` drafts computed as the runtime computes it after
a fully accepted block, the text's tokens as drafts). Methods, per KV head, at the same chunk counts:

- ``verification-guided``: top-p (uniform ``p`` over the sparse layers) of the last verification's attention;
- ``streaming``: sink + recent chunks (StreamingLLM; MagicDec's draft), given the same count per (layer, query);
- ``quest``: per query head, the chunks with the largest key-bound score for the draft's own query (Quest).

Reported per (context, k, method, p): mean accepted length (greedy: tokens per step), the expected one under
rejection sampling at temperature 0.8, acceptance rates, the draft's KV read (sparse layers, all layers). A few
real ``SpecAttnRuntime.generate`` runs (greedy, the model's own continuation rather than the text) check the
teacher-forced numbers.

    python bench/self_spec_quality.py --contexts 2048 6144 --num-texts 4 --out bench/self_spec_quality_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ itself is sys.path[0]: replace it (its kernels.py would shadow the `kernels` package
# that transformers imports where it is installed)
sys.path[0:1] = [str(ROOT)] if Path(sys.path[0]).resolve() == ROOT / "bench" else [str(ROOT), sys.path[0]]

from pipelines import self_tuning as S  # noqa: E402
from specattn_runtime.models import special_prefix  # noqa: E402
from pipelines.eval_text import book_windows, load_books  # noqa: E402
from pipelines.presets import PAIRS  # noqa: E402
from specattn_runtime.models import load_causal_lm, load_tokenizer  # noqa: E402

METHODS = ("verification-guided", "streaming", "quest")


def chunk_fns(layers: list[int], p: float):
    """The three methods' ``chunk_fn`` for :func:`pipelines.self_tuning.measure`; baselines get the chunk counts
    of the verification-guided selection of the same window."""
    def vg(w):
        return S.chunks_for(w, layers, {j: p for j in layers}), None

    def budgets(w):
        return {j: S.matched_budget(c) for j, c in vg(w)[0].items()}

    def streaming(w):
        return {j: S.streaming_chunks(b, w.ids.numel(), w.chunk_size) for j, b in budgets(w).items()}, None

    def quest(w):
        return None, budgets(w)

    return {"verification-guided": vg, "streaming": streaming, "quest": quest}


def with_k(w: S.DenseWindow, k: int) -> S.DenseWindow:
    """A dense pass recorded for the largest k, viewed for a smaller one (its rows are the last ``Q + k + 1``)."""
    return S.DenseWindow(w.ids, w.logits, {j: r[:, -(w.n_region + k + 1):] for j, r in w.rows.items()}, w.kv,
                         w.n_region, k, w.chunk_size)


def runtime_check(model_dir: str, prompt: list[int], p: float, k: int, n_new: int, dense: int, n_layers: int) -> dict:
    """One real greedy generation through the runtime with a uniform-p self artifact (built in memory)."""
    from pipelines.calibrate_self import uniform_artifact
    from specattn_runtime import SpecAttnRuntime, hooks

    model = load_causal_lm(model_dir, attn_implementation=hooks.register())
    rt = SpecAttnRuntime(uniform_artifact(n_layers, p, dense), None, model)
    st = rt.generate(prompt, n_new, k=k, eos_token_id=None).stats
    read = st.kv_read_fraction
    return {"p": p, "k": k, "new_tokens": st.new_tokens, "mean_accepted_length": st.mean_accepted_length,
            "draft_kv_read_sparse_layers": sum(read[dense:]) / (n_layers - dense),
            "draft_kv_read_all_layers": sum(read) / n_layers}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["context"], r["k"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=110, squeeze=False)
    for ax, (ctx, k) in zip(axes[0], panels):
        for m, color in zip(METHODS, ("C0", "C1", "C2")):
            pts = sorted((r["draft_kv_read_sparse_layers"], r["mean_accepted_length"], r["mean_accepted_length_t0.8"])
                         for r in rows if (r["context"], r["k"], r["method"]) == (ctx, k, m))
            ax.plot([100 * x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", color=color, label=f"{m} greedy")
            ax.plot([100 * x for x, _, _ in pts], [z for _, _, z in pts], ls="--", color=color, label=f"{m} T=0.8")
        ax.axvline(10, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{ctx} tokens, k = {k}", fontsize=9)
        ax.set_xlabel("KV read by the draft, sparse layers (%)")
        ax.set_ylabel("mean accepted length (tokens / step)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Self-speculation, SmolLM2-135M, teacher-forced on book text", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 6144])
    ap.add_argument("--num-texts", type=int, default=4)
    ap.add_argument("--region", type=int, default=256, help="draft positions measured per text (the last ones)")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--p", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85, 0.95])
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--text", help="directory or .txt file of books (default: the Austen novels)")
    ap.add_argument("--runtime-tokens", type=int, default=96, help="tokens per real runtime check (0: none)")
    ap.add_argument("--out", default="bench/self_spec_quality_cpu.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model_dir = str(PAIRS["quick"].ensure()[1])
    model = load_causal_lm(model_dir, attn_implementation=S.register())
    n_layers = model.config.num_hidden_layers
    layers = list(range(args.dense_layers, n_layers))
    tok = load_tokenizer(model_dir)
    name, books = load_books(args.text)
    tokens = {k: tok(v, add_special_tokens=False).input_ids for k, v in books.items()}
    prefix = special_prefix(tok)  # windows start as the model's inputs do (BOS where the tokenizer adds one)
    rows, checks, t0 = [], [], time.time()
    kmax = max(args.k)
    for ctx in args.contexts:
        windows, labels = book_windows(tokens, ctx, args.num_texts, prefix=prefix)
        q = S.region_size(ctx, args.region, kmax) // kmax * kmax
        totals: dict = {}
        for i in range(windows.shape[0]):
            dense = S.dense_pass(model, windows[i], q, kmax, layers, 16)
            for k in args.k:
                w = with_k(dense, k)
                for p in args.p:
                    for m, fn in chunk_fns(layers, p).items():
                        stats = S.measure(model, [w], layers, fn, temperatures=(0.8,))
                        totals[(k, m, p)] = S.add_stats(totals.get((k, m, p)), stats)
            print(f"{ctx} tokens: text {i + 1}/{windows.shape[0]} ({labels[i]}) done at {time.time() - t0:.0f} s",
                  flush=True)
        for (k, m, p), tot in totals.items():
            rows.append({"context": ctx, "k": k, "method": m, "p": p, **S.summarize(tot, k, n_layers, layers)})
        if args.runtime_tokens:
            prompt = windows[0, : ctx - args.runtime_tokens - kmax - 2].tolist()
            for p in (0.5, 0.85):
                checks.append({"context": ctx, **runtime_check(model_dir, prompt, p, 4, args.runtime_tokens,
                                                               args.dense_layers, n_layers)})
                print(f"runtime check {checks[-1]}", flush=True)
    device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
           "model": Path(model_dir).name,
           "text": name, "command": " ".join(sys.argv), "region_queries": args.region, "rows": rows,
           "runtime_checks": checks, "seconds": time.time() - t0}
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(rows, Path(args.out).with_suffix(".png"))
    print("| context | k | method | p | accepted length (greedy) | at T=0.8 | draft KV read, sparse layers "
          "| all layers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["context"], r["k"], r["p"], r["method"])):
        print(f"| {r['context']} | {r['k']} | {r['method']} | {r['p']} | {r['mean_accepted_length']:.2f} | "
              f"{r['mean_accepted_length_t0.8']:.2f} | {r['draft_kv_read_sparse_layers']:.1%} | "
              f"{r['draft_kv_read_all_layers']:.1%} |")


if __name__ == "__main__":
    main()
