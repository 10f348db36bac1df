"""Reports of a quality evaluation: the headline table (markdown), Prefect table rows and the trade-off plot.

Input everywhere is the evaluation JSON's ``methods`` mapping (see :func:`pipelines.sparse_eval.summarize`).
"""

from __future__ import annotations

import math
from pathlib import Path

from .sparse_eval import GROUP_GLOBAL, GROUP_HEAD_GLOBAL

_KIND_ORDER = {"dense": 0, "streaming": 1, "quest": 2, "oracle": 3, "oracle_head": 3, "specattn": 4,
               "specattn_head": 5}


_NAMES = {"dense": "Dense", "streaming": "StreamingLLM (sink + recent)", "quest": "Quest (min/max key bounds)",
          "oracle": "Oracle top-p (target's own attention)",
          "oracle_head": "Oracle top-p per KV head (target's own attention)"}


def describe(row: dict) -> str:
    """Human-readable method name, e.g. ``SpecAttn, global p = 0.95``."""
    sd = ", sparse draft" if row.get("sparse_draft") else ""  # selections recorded by the sparse draft
    if row["kind"] == "specattn_head":
        if row["group"] == GROUP_HEAD_GLOBAL:
            return f"SpecAttn per KV head, global p = {row['x']:g}{sd}"
        return f"SpecAttn per KV head, calibrated per-head p (recall >= {row['x']:g}){sd}"
    if row["kind"] != "specattn":
        return _NAMES[row["kind"]]
    if row["group"] == GROUP_GLOBAL:
        return f"SpecAttn, global p = {row['x']:g}{sd}"
    return f"SpecAttn, calibrated per-layer p (recall >= {row['x']:g}){sd}"


def table_rows(methods: dict[str, dict]) -> list[dict]:
    """Headline rows in the paper's order: dense, baselines, oracle, SpecAttn global p, SpecAttn calibrated."""
    rows = [dict(name=name, **r) for name, r in methods.items() if r.get("in_table")]
    rows.sort(key=lambda r: (_KIND_ORDER[r["kind"]], r["group"] not in (GROUP_GLOBAL, GROUP_HEAD_GLOBAL),
                             r["x"] or 0, bool(r.get("sparse_draft"))))  # a sparse-draft row after its dense one
    return [{"method": describe(r), "budget": _budget(r), "perplexity": round(r["perplexity"], 3),
             "ppl_increase_pct": round(100 * r["perplexity_increase"], 2),
             "kv_reduction_sparse_pct": round(100 * r["kv_reduction_sparse_layers"], 1),
             "kv_reduction_all_pct": round(100 * r["kv_reduction_all_layers"], 1),
             "mean_chunks_per_sparse_layer": round(r["mean_chunks_sparse_layers"], 1)} for r in rows]


def _budget(r: dict) -> str:
    if r["kind"] == "dense":
        return "-"
    if r["kind"] in ("streaming", "quest"):
        return f"= chunks of {r['match']}"
    return f"p = {r['x']:g}" if r["group"] in (GROUP_GLOBAL, GROUP_HEAD_GLOBAL) else f"recall >= {r['x']:g}"


def markdown_table(methods: dict[str, dict]) -> str:
    rows = table_rows(methods)
    head = ("| Method | Budget | PPL | PPL increase | KV reduction (sparse layers) | KV reduction (all layers) "
            "| chunks / sparse layer |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['perplexity']:.3f} | {r['ppl_increase_pct']:+.2f}% | "
                     f"{r['kv_reduction_sparse_pct']:.1f}% | {r['kv_reduction_all_pct']:.1f}% | "
                     f"{r['mean_chunks_per_sparse_layer']:.1f} |")
    return "\n".join(lines)


def curves(methods: dict[str, dict]) -> dict[str, list[tuple[float, float, float]]]:
    """``{group: [(kv_reduction_all_layers, ppl_increase, x), ...]}`` sorted by KV reduction (dense excluded)."""
    out: dict[str, list] = {}
    for r in methods.values():
        if r["kind"] != "dense":
            out.setdefault(r["group"], []).append(
                (r["kv_reduction_all_layers"], r["perplexity_increase"], r["x"]))
    return {g: sorted(v) for g, v in out.items()}


def cumulative_perplexity(step_nll: list[float]) -> list[float]:
    """Perplexity over the first ``i + 1`` decode steps, for every ``i`` (the paper's Fig. 5)."""
    out, total = [], 0.0
    for i, v in enumerate(step_nll):
        total += v
        out.append(math.exp(total / (i + 1)))
    return out


def curve_style(group: str) -> dict:
    """Matplotlib style of a curve: colour by method family (SpecAttn, SpecAttn per KV head, Quest, StreamingLLM,
    oracle), dashed where the selection or the budget it copies is per KV head, square markers for global p."""
    per_head = "per-head" in group or "per KV head" in group
    if group.startswith("SpecAttn"):
        color = "tab:red" if per_head else "tab:blue"
    else:
        color = next(c for key, c in (("Quest", "tab:green"), ("StreamingLLM", "tab:gray"),
                                      ("Oracle", "tab:purple"), ("", "tab:olive")) if key in group)
    marker = "s" if "global p" in group else "^" if "sparse draft" in group else "o"
    style = {"color": color, "ls": "--" if per_head else "-", "marker": marker}
    if "oracle KV" in group:  # a baseline at the oracle's budget: a reference point, not a competitor's curve
        style.update(ls=":", marker="x")
    return style


def plot_tradeoff(methods: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """PNG: perplexity increase vs KV reduction (all layers), one curve per method, plus the goal box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    for group, pts in sorted(curves(methods).items()):
        xs, ys = [100 * p[0] for p in pts], [100 * p[1] for p in pts]
        ax.plot(xs, ys, label=group, **curve_style(group))
    ax.axhline(5, color="grey", lw=0.8, ls="--")
    ax.axvline(75, color="grey", lw=0.8, ls="--")
    ax.text(75.5, 5.5, "goal: >= 75% KV skipped at <= 5% PPL", fontsize=7, color="grey")
    ax.set_xlabel("KV reduction, all layers (%)")
    ax.set_ylabel("perplexity increase over dense (%)")
    ax.set_yscale("symlog", linthresh=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the axes
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
