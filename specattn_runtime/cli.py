"""``specattn generate``: stream text from a prompt file with sparse speculative decoding; ``specattn serve``: the
same runtime behind an OpenAI-compatible HTTP server (``specattn_runtime/serve``).

``--artifact`` of mode ``draft`` needs ``--draft`` and ``--target``; of mode ``self`` (the target drafts for itself
with sparse attention, lossless), ``--target`` alone.

Every mistake in the command line is one ``specattn: error: ...`` line and exit code 2, found before any model is
loaded where it can be (arguments, files, device, backend); ``--debug`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import validate


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        sys.stderr.write(f"specattn: error: {message}\n")
        sys.exit(2)


def read_prompt(path: str) -> str:
    """The prompt text: ``-`` is stdin; a file must exist and be UTF-8 (the error gives the first bad byte)."""
    if path == "-":
        data, name = sys.stdin.buffer.read(), "standard input"
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise ValueError(f"prompt file {p} does not exist")
        if not p.is_file():
            raise ValueError(f"prompt file {p} is not a file")
        data, name = p.read_bytes(), f"prompt file {p}"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text: byte {e.start} is {data[e.start:e.start + 1]!r} "
                         f"({e.reason}); convert it, e.g. iconv -t UTF-8") from None


def _model_args(p: argparse.ArgumentParser) -> None:
    """What both commands need to load a runtime."""
    p.add_argument("--artifact", required=True, help="calibration artifact (.safetensors)")
    p.add_argument("--draft", help="draft model directory (mode 'draft' artifacts; a mode 'self' artifact takes "
                   "none: the target drafts for itself)")
    p.add_argument("--target", required=True, help="target model directory")
    p.add_argument("--backend", default="auto", choices=validate.BACKENDS,
                   help="sparse attention backend (auto: triton on CUDA, torch elsewhere)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--allow-mismatch", action="store_true", help="accept models whose hashes differ")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="specattn")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text with SpecAttn")
    _model_args(g)
    g.add_argument("--prompt-file", required=True, help="UTF-8 text file holding the prompt ('-' for stdin)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--k", type=int, default=6, help="drafted tokens per verification (0: the target alone)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of tokens (not KV selection)")
    g.add_argument("--seed", type=int)
    g.add_argument("--engine", default="auto", choices=validate.ENGINES,
                   help="static: preallocated caches + CUDA graphs (default on CUDA); eager: the reference loop")
    s = sub.add_parser("serve", help="serve the OpenAI API (/v1/completions, /v1/chat/completions) with "
                       "continuous batching")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--k", type=int, default=6, help="drafted tokens per step (0: the target alone)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded in one step")
    s.add_argument("--kv-memory-gb", type=float, help="GiB of K/V in the paged pool (both models; default: 85%% "
                   "of the free GPU memory on CUDA, 1 on the CPU)")
    s.add_argument("--max-model-len", type=int, help="longest prompt + generation (default: the models' context "
                   "on CUDA, 2048 on the CPU, whose attention reads the whole page table every step)")
    s.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 503")
    s.add_argument("--served-model-name", help="the model name clients send (default: the target's directory)")
    return ap


def _generate(args: argparse.Namespace) -> None:
    # Everything checkable without the models first: a typo should not cost a minute of model loading.
    validate.generation(args.max_new_tokens, args.k, args.temperature, args.top_p, args.seed, None, None)
    validate.kernels(args.backend, "auto", args.engine, validate.device(args.device))
    prompt = read_prompt(args.prompt_file)

    from .runtime import SpecAttnRuntime

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


def _serve(args: argparse.Namespace) -> None:
    validate.generation(1, args.k, 0.0, 1.0, None, None, None)
    for name in ("max_batch", "max_waiting", "port"):
        validate._integer(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    dev = validate.device(args.device)
    validate.kernels(args.backend, "auto", "auto", dev)
    try:
        from .serve import create_app, run
    except ImportError as e:
        raise ValueError(f"specattn serve needs the serve extra ({e.name} is missing): pip install "
                         "'specattn[serve]'") from None
    from .runtime import SpecAttnRuntime

    rt = SpecAttnRuntime.from_artifact(args.artifact, draft=args.draft, target=args.target, device=args.device,
                                       backend=args.backend, allow_mismatch=args.allow_mismatch)
    on_cpu = dev.type == "cpu"
    max_len = args.max_model_len or (min(2048, rt.context_limit(args.k)) if on_cpu else None)
    app = create_app(rt, model_name=args.served_model_name or Path(args.target).name, k=args.k,
                     max_batch=args.max_batch, kv_memory_gb=args.kv_memory_gb or (1.0 if on_cpu else None),
                     max_model_len=max_len, max_waiting=args.max_waiting)
    run(app, args.host, args.port)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        (_serve if args.cmd == "serve" else _generate)(args)
    except KeyboardInterrupt:
        sys.stderr.write("specattn: interrupted\n")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into a one-line message
        if args.debug:
            raise
        message = (str(e) or type(e).__name__).replace("\n", "; ")
        sys.stderr.write(f"specattn: error: {message}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
