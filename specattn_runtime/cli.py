"""``specattn generate``: stream text from a prompt file with sparse speculative decoding."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="specattn")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text with SpecAttn")
    g.add_argument("--artifact", required=True, help="calibration artifact (.safetensors)")
    g.add_argument("--draft", required=True, help="draft model directory")
    g.add_argument("--target", required=True, help="target model directory")
    g.add_argument("--prompt-file", required=True, help="UTF-8 text file holding the prompt ('-' for stdin)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--k", type=int, default=6, help="drafted tokens per verification (0: the target alone)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of tokens (not KV selection)")
    g.add_argument("--seed", type=int)
    g.add_argument("--backend", default="auto",
                   help="sparse attention backend: auto (triton on CUDA, torch elsewhere)|torch|triton|flashinfer")
    g.add_argument("--device", default="cpu")
    g.add_argument("--engine", default="auto", choices=["auto", "static", "eager"],
                   help="static: preallocated caches + CUDA graphs (default on CUDA); eager: the reference loop")
    g.add_argument("--allow-mismatch", action="store_true", help="accept models whose hashes differ")
    args = ap.parse_args(argv)

    from .runtime import SpecAttnRuntime

    prompt = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text(encoding="utf-8")
    rt = SpecAttnRuntime.from_artifact(args.artifact, draft=args.draft, target=args.target, device=args.device,
                                       backend=args.backend, allow_mismatch=args.allow_mismatch, engine=args.engine)
    ids = rt.tokenizer(prompt).input_ids
    emitted: list[int] = []
    shown = ""

    def stream(new: list[int]) -> None:
        nonlocal shown
        emitted.extend(new)
        text = rt.tokenizer.decode(emitted, skip_special_tokens=True)
        sys.stdout.write(text[len(shown):])  # decode the whole tail: multi-token characters print whole
        sys.stdout.flush()
        shown = text

    out = rt.generate(ids, args.max_new_tokens, k=args.k, temperature=args.temperature, top_p=args.top_p,
                      seed=args.seed, on_tokens=stream)
    sys.stdout.write("\n")
    print(json.dumps(out.stats.summary(), indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
