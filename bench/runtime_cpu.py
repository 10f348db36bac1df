"""Runtime on the real shipped pair (CPU, for the record): dense vs sparse verification, side by side.

Same prompts, same models, one process: autoregressive greedy (transformers ``generate``), speculative with
dense verification (every layer p = 1), and SpecAttn with the calibrated artifact. Prints a table and writes JSON.

    python bench/runtime_cpu.py --artifact artifacts/quick/latest.safetensors --out bench/runtime_cpu.json
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

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ itself is sys.path[0]: replace it (its kernels.py would shadow the `kernels` package
# that transformers imports where it is installed)
sys.path[0:1] = [str(ROOT)] if Path(sys.path[0]).resolve() == ROOT / "bench" else [str(ROOT), sys.path[0]]

from pipelines.presets import PAIRS  # noqa: E402
from specattn_runtime import SpecAttnRuntime  # noqa: E402


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    from pipelines import assets
    from pipelines.corpus import wiki_articles

    arts = [t for _, t in wiki_articles(assets.fetch(assets.ENWIKI_BZ2)) if len(t) > 8 * length][-n:]
    return [tokenizer(t).input_ids[:length] for t in arts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", default="artifacts/quick/latest.safetensors")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default="bench/runtime_cpu.json")
    args = ap.parse_args()
    draft, target = PAIRS["quick"].ensure()
    rt = SpecAttnRuntime.from_artifact(args.artifact, draft=draft, target=target)
    dense_rt = SpecAttnRuntime(dataclasses.replace(rt.artifact, top_p=torch.ones_like(rt.artifact.top_p)),
                               rt.draft, rt.target, rt.tokenizer)
    rows = []
    for i, ids in enumerate(prompts(rt.tokenizer, args.prompts, args.prompt_tokens)):
        t0 = time.perf_counter()
        with torch.no_grad():
            x = torch.tensor([ids])
            ar = rt.target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                    do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        t_ar = time.perf_counter() - t0
        dense = dense_rt.generate(ids, args.new_tokens, k=args.k, eos_token_id=None)
        sparse = rt.generate(ids, args.new_tokens, k=args.k, eos_token_id=None)
        first_diff = next((j for j, (a, b) in enumerate(zip(sparse.tokens, ar)) if a != b), None)
        rows.append({
            "prompt": i, "ar_tok_s": len(ar) / t_ar,
            "dense": dense.stats.summary(), "sparse": sparse.stats.summary(),
            "sparse_kv_read_per_layer": sparse.stats.kv_read_fraction,
            "dense_equals_ar": dense.tokens == ar, "sparse_tokens_differing": sum(a != b for a, b in zip(sparse.tokens, ar)),
            "sparse_first_divergence": first_diff,
        })
    print(f"\nquick pair on CPU ({torch.get_num_threads()} threads), prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new, k={args.k}; artifact {args.artifact}")
    print(f"{'prompt':>6} {'AR tok/s':>9} {'spec-dense tok/s':>17} {'SpecAttn tok/s':>15} {'acc.len dense':>14} "
          f"{'acc.len sparse':>15} {'KV read sparse':>15} {'dense==AR':>10} {'first diff':>11}")
    for r in rows:
        print(f"{r['prompt']:>6} {r['ar_tok_s']:>9.2f} {r['dense']['tokens_per_second']:>17.2f} "
              f"{r['sparse']['tokens_per_second']:>15.2f} {r['dense']['mean_accepted_length']:>14.3f} "
              f"{r['sparse']['mean_accepted_length']:>15.3f} {r['sparse']['kv_read_mean']:>15.3f} "
              f"{str(r['dense_equals_ar']):>10} {str(r['sparse_first_divergence']):>11}")
    meta = {"host": platform.node(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **vars(args)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
