"""KV-cache memory the engines allocate, against a full-length allocation for every layer (no GPU, no weights).

For each pair of bench/e2e.py (models built on the ``meta`` device: shapes only) and context length: the
single-sequence engine's :class:`~specattn_runtime.engine.KVStore` (window layers in rings of
``window + MAX_FORWARD_TOKENS`` slots, plus the rings' prefix-reuse snapshots) and the batched engine's
:class:`~specattn_runtime.engine.pages.PagedKVPool` for ``--batch`` sequences (window layers in ring pages, one set per
sequence), each beside the same structure with every layer at full length. These are the allocations the code
makes (the tensors' sizes), not an estimate.

    python3 bench/kv_memory.py --pairs gemma3 llama3 --contexts 32768 131072 --batch 16 --out bench/kv_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ itself is sys.path[0]: replace it (its kernels.py would shadow the `kernels` package
# that transformers imports where it is installed)
sys.path[0:1] = [str(ROOT)] if Path(sys.path[0]).resolve() == ROOT / "bench" else [str(ROOT), sys.path[0]]

from bench.e2e import PAIRS, build  # noqa: E402
from specattn_runtime.batched import PAGE_SIZE  # noqa: E402
from specattn_runtime.engine import KVStore  # noqa: E402
from specattn_runtime.engine.pages import PagedKVPool  # noqa: E402

GIB = 2**30


def rows_for(pair: str, contexts: list[int], batch: int) -> list[dict]:
    rows = []
    for ctx in contexts:
        capacity = ctx + 64  # a prompt of ctx tokens and a short generation
        t_cfg, d_cfg = PAIRS[pair]
        models = {"target": build(t_cfg, capacity, "meta"), "draft": build(d_cfg, capacity, "meta")}
        for who, roles in (("target", ("target",)), ("pair", ("target", "draft"))):
            ms = {r: models[r] for r in roles}
            store = KVStore(ms, capacity)
            pages = batch * (-(-capacity // PAGE_SIZE))
            pool = PagedKVPool(ms, pages + 1, PAGE_SIZE, ring_sequences=batch)
            full_pool = PagedKVPool(ms, pages + 1, PAGE_SIZE)
            rows.append({"pair": pair, "models": who, "context": ctx, "batch": batch,
                         "single_bytes": store.nbytes(), "single_full_bytes": store.nbytes_full(),
                         "batched_bytes": pool.nbytes(), "batched_full_bytes": full_pool.nbytes(),
                         "ring_slots": pool.ring_slots,
                         "window_layers": {r: sum(bool(x) for x in store.ring[r]) for r in roles},
                         "layers": {r: len(store.ring[r]) for r in roles}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["gemma3"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="bench/kv_memory.json")
    args = ap.parse_args()
    rows = [r for pair in args.pairs for r in rows_for(pair, args.contexts, args.batch)]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "meta (shapes only)",
            **vars(args)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("| pair | models | context | single seq. GiB (rings) | full length GiB | share | "
          f"batch {args.batch} GiB (ring pages) | full length GiB | share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['models']} | {r['context']} | {r['single_bytes'] / GIB:.2f} | "
              f"{r['single_full_bytes'] / GIB:.2f} | {r['single_bytes'] / r['single_full_bytes']:.1%} | "
              f"{r['batched_bytes'] / GIB:.2f} | {r['batched_full_bytes'] / GIB:.2f} | "
              f"{r['batched_bytes'] / r['batched_full_bytes']:.1%} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
