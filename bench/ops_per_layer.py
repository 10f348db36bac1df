"""Operators one decode forward runs per decoder layer, per architecture of bench/e2e.py (CPU, no weights needed).

In a CUDA graph of an uncompiled forward every operator that computes is one kernel launch, and small kernels
cost a few microseconds each however little they read; ``torch.compile`` fuses the elementwise chains (norms,
activations, residuals) into a few. This counts, for a one-token forward after a short prefill (transformers'
``sdpa`` attention, the shapes shrunk: the count does not depend on widths), the computing ATen operators (leaves of
the profiler's tree, views and allocations left out), per decoder layer (the difference between 4 and 2 layers)
and outside the layers (embedding, final norm, head).

    python3 bench/ops_per_layer.py --pairs llama3 gemma3 --out bench/ops_per_layer_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ itself is sys.path[0]: replace it (its kernels.py would shadow the `kernels` package
# that transformers imports where it is installed)
sys.path[0:1] = [str(ROOT)] if Path(sys.path[0]).resolve() == ROOT / "bench" else [str(ROOT), sys.path[0]]

from bench.e2e import PAIRS  # noqa: E402

# operators that launch no kernel on a GPU (views, metadata, allocation)
NO_KERNEL = {"empty", "empty_like", "empty_strided", "view", "reshape", "_reshape_alias", "_unsafe_view",
             "as_strided", "t", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze", "detach", "alias",
             "permute", "resolve_conj", "resolve_neg", "result_type", "lift_fresh", "split", "chunk", "narrow",
             "contiguous", "item", "_local_scalar_dense", "is_nonzero", "unbind", "lift_fresh_copy", "size", "stride"}


def computing_ops(config_kwargs: dict, n_layers: int) -> int:
    """Computing ATen operators in one one-token forward of a ``n_layers``-layer model of this architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    cfg = dict(config_kwargs)
    model_type = cfg.pop("model_type", "llama")
    heads, kv_heads = 4, min(cfg["num_key_value_heads"], 2)
    cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=n_layers, vocab_size=1000,
               num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    if "layer_types" in cfg:  # keep both kinds of layer in the model
        cfg.update(head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention"] * (n_layers // 2))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), attn_implementation="sdpa")
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.eval()(ids, past_key_values=cache, use_cache=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(ids[:, :1], past_key_values=cache, use_cache=True)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    parents = {id(e.cpu_parent) for e in events if e.cpu_parent is not None}
    return sum(1 for e in events if id(e) not in parents and e.name.removeprefix("aten::") not in NO_KERNEL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS))
    ap.add_argument("--out", default="bench/ops_per_layer.json")
    args = ap.parse_args()
    rows = []
    print(f"{'pair':8} {'model':7} {'layers':>6} {'ops/layer':>9} {'ops outside':>11} {'ops/forward':>11}")
    for pair in args.pairs:
        for role, cfg in zip(("target", "draft"), PAIRS[pair]):
            two, four = computing_ops(cfg, 2), computing_ops(cfg, 4)
            per_layer, outside = (four - two) / 2, two - (four - two)
            total = outside + per_layer * cfg["num_hidden_layers"]
            rows.append({"pair": pair, "model": role, "model_type": cfg.get("model_type", "llama"),
                         "layers": cfg["num_hidden_layers"], "ops_per_layer": per_layer, "ops_outside_layers": outside,
                         "ops_per_forward": total})
            print(f"{pair:8} {role:7} {cfg['num_hidden_layers']:6d} {per_layer:9.0f} {outside:11.0f} {total:11.0f}")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "attention": "sdpa", "what": "computing ATen operators of a one-token forward (views left out)"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
