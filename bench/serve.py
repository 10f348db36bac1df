"""Serving benchmark (vLLM's ``benchmark_serving`` shape): Poisson arrivals against ``specattn serve`` over HTTP.

For each method a server process runs the app (``specattn_runtime/serve``) over random-weight models of the pair's
architecture; this process sends ``--num-prompts`` streaming completions per arrival rate (exponential gaps, seeded),
prompts of uniformly drawn lengths in ``--input-len MIN MAX`` (random token ids: the server runs without a tokenizer,
as vLLM's ``--skip-tokenizer-init``), ``--output-len`` tokens each (no EOS), and measures per request the time to
first token (TTFT) and the time per output token after it (TPOT = (end - first) / (tokens - 1)), output throughput
(tokens / (last end - first send)), and, from the server's ``/metrics``, the share of loaded wall time the engine
spent outside its steps and prefills (the device's idle share between steps).

Methods: ``ar`` (``k = 0``: the target alone), ``specattn`` (draft model + sparse verification at ``--density``),
``self_spec`` (the target drafts over ``--self-density`` of its KV, verifies densely). Random weights cannot show
acceptance or sparsity: as in bench/throughput.py, accepted lengths and per-layer p are **forced** inputs
(``ForcedBatchAcceptance``); everything else -- HTTP, the engine thread, admission, chunked prefill, paged
attention, selection -- runs for real.

    python3 bench/serve.py --pair llama3 --out bench/serve_llama3_h200.json     # GPU (add --methods M --append to
                                                                              # run one method per command)
    python3 bench/serve.py --smoke                                            # a tiny CPU run that checks the path
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import random
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
# The script's own folder comes off the path: bench/kernels.py would shadow the `kernels` package that transformers
# imports when it builds a model (in the spawned server process).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench.e2e import PAIRS, artifact_for, build  # noqa: E402
from bench.throughput import ForcedBatchAcceptance  # noqa: E402

METHODS = ("ar", "specattn", "self_spec")
SMOKE_PAIR = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512),
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512))


def _tiny_cpu(cfg: dict, max_pos: int):
    """A small random float32 Llama on the CPU (the smoke run's stand-in for ``bench.e2e.build``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specattn_runtime import hooks

    config = LlamaConfig(**cfg, max_position_embeddings=max_pos)
    config._attn_implementation = hooks.register()
    return LlamaForCausalLM(config).eval()


def runtime_for(method: str, args):
    """The method's runtime over random weights (seeded: every server process builds the same models)."""
    import dataclasses

    from specattn_runtime import SpecAttnRuntime

    torch.manual_seed(0)
    t_cfg, d_cfg = SMOKE_PAIR if args.smoke else PAIRS[args.pair]
    max_pos = args.input_len[1] + args.output_len + 64
    make = _tiny_cpu if args.smoke else build
    target = make(t_cfg, max_pos)
    n_t = target.config.num_hidden_layers
    kw = dict(engine="static", compile=args.compile and not args.smoke)
    if method == "self_spec":
        art = artifact_for(n_t, n_t, args.self_density)
        art = dataclasses.replace(art, layer_map=torch.tensor([-1, -1] + list(range(2, n_t)), dtype=torch.int32),
                                  metadata={**art.metadata, "mode": "self"})
        rt, acc = SpecAttnRuntime(art, None, target, **kw), args.self_accepted_length
    else:
        draft = make(d_cfg, max_pos)
        art = artifact_for(n_t, draft.config.num_hidden_layers, args.density)
        rt, acc = SpecAttnRuntime(art, draft, target, **kw), args.accepted_length
    rt.batch_engine_class = functools.partial(ForcedBatchAcceptance, accepted_length=acc if method != "ar" else 1.0)
    return rt


def serve_process(method: str, args, port: int, ready) -> None:
    """The server: the method's runtime behind the OpenAI app, on ``port`` (runs in a child process)."""
    from specattn_runtime.serve import create_app, run

    try:
        rt = runtime_for(method, args)
        app = create_app(rt, model_name="bench", k=0 if method == "ar" else args.k, max_batch=args.max_batch,
                         kv_memory_gb=args.kv_memory_gb, max_model_len=args.input_len[1] + args.output_len + 32,
                         max_waiting=10 * args.num_prompts)
    except BaseException as e:  # noqa: BLE001 - the parent waits for this message
        ready.put(f"error: {e!r}")
        raise
    ready.put("ok")
    run(app, "127.0.0.1", port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client, prompt: list[int], output_len: int) -> dict:
    """One streamed completion: send time, first-token time, end time, tokens (the server's usage)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first, tokens, error = None, 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
                continue
            choice = event["choices"][0]
            if first is None and choice.get("token_ids"):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    if error or first is None:
        return {"error": error or "no token came back"}
    return {"t_send": t0, "ttft": first - t0, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens,
            "t_end": end}


def engine_seconds(client_sync, url: str) -> tuple[float, float]:
    """(busy, loaded) seconds of the engine, from /metrics."""
    text = client_sync.get(url + "/metrics").text
    values = dict(line.split() for line in text.splitlines() if line.startswith("specattn_engine_"))
    return float(values["specattn_engine_busy_seconds"]), float(values["specattn_engine_loaded_seconds"])


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def run_rate(url: str, rate: float, args, vocab: int, seed: int) -> dict:
    import httpx

    rnd = random.Random(seed)
    lo, hi = args.input_len
    prompts = [[rnd.randrange(vocab) for _ in range(rnd.randint(lo, hi))] for _ in range(args.num_prompts)]
    gaps = [rnd.expovariate(rate) for _ in prompts]
    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as c:
        tasks = []
        for prompt, gap in zip(prompts, gaps):
            tasks.append(asyncio.create_task(one_request(c, prompt, args.output_len)))
            await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    if not ok:
        return {"rate": rate, "errors": errors[:5], "n_errors": len(errors)}
    span = max(r["t_end"] for r in ok) - min(r["t_send"] for r in ok)
    ttft, tpot = [r["ttft"] for r in ok], [r["tpot"] for r in ok]
    return {"rate": rate, "completed": len(ok), "n_errors": len(errors), "errors": errors[:3],
            "output_throughput": sum(r["tokens"] for r in ok) / span, "duration_s": span,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_ms": 1e3 * percentile(tpot, 50), "tpot_p99_ms": 1e3 * percentile(tpot, 99)}


def bench_method(method: str, args) -> list[dict]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ctx = mp.get_context("spawn")  # a fresh process: its own CUDA context, models and GIL
    ready = ctx.Queue()
    proc = ctx.Process(target=serve_process, args=(method, args, port, ready), daemon=True)
    proc.start()
    rows = []
    try:
        status = ready.get(timeout=1800)
        if status != "ok":
            raise RuntimeError(f"{method}: the server failed to start: {status}")
        with httpx.Client(timeout=10) as h:
            while True:  # the app is built; uvicorn binds after the warm-up (graph capture) in its lifespan
                try:
                    if h.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if not proc.is_alive():
                    raise RuntimeError(f"{method}: the server exited (code {proc.exitcode})")
                time.sleep(0.5)
            vocab = (SMOKE_PAIR if args.smoke else PAIRS[args.pair])[0]["vocab_size"]
            warm = argparse.Namespace(**{**vars(args), "num_prompts": min(4, args.num_prompts)})
            asyncio.run(run_rate(url, 100.0, warm, vocab, seed=1))  # first prefills and buckets outside the timing
            for i, rate in enumerate(args.rates):
                busy0, loaded0 = engine_seconds(h, url)
                row = asyncio.run(run_rate(url, rate, args, vocab, seed=100 + i))
                busy1, loaded1 = engine_seconds(h, url)
                row |= {"method": method, "idle_share": 1 - (busy1 - busy0) / max(loaded1 - loaded0, 1e-9)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.join(30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), default="llama3")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0], help="requests per second")
    ap.add_argument("--num-prompts", type=int, default=24, help="requests per rate")
    ap.add_argument("--input-len", type=int, nargs=2, default=[8192, 32768], metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--kv-memory-gb", type=float, default=None, help="default: 85%% of the free GPU memory")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--accepted-length", type=float, default=3.0, help="specattn: forced tokens per step")
    ap.add_argument("--density", type=float, default=0.4, help="specattn: forced p of every sparse layer")
    ap.add_argument("--self-accepted-length", type=float, default=3.5)
    ap.add_argument("--self-density", type=float, default=0.05, help="self_spec: forced p of the drafting layers")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model forward")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU: checks the path only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--append", action="store_true", help="keep the other methods' rows already in --out (one "
                    "method per command fits a 10-minute limit)")
    args = ap.parse_args()
    if args.smoke:
        args.input_len, args.output_len, args.num_prompts = [16, 96], 8, 6
        args.rates, args.kv_memory_gb, args.max_batch = [4.0], args.kv_memory_gb or 0.05, min(args.max_batch, 4)
        device = "cpu (smoke: tiny random Llama)"
    else:
        device = torch.cuda.get_device_name()
    out = args.out or ("bench/serve_smoke_cpu.json" if args.smoke else
                       f"bench/serve_{args.pair}_{device.split()[-1].lower()}.json")
    meta = {"device": device, "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "forced": "acceptance length and per-layer density are forced inputs "
            "(random weights)", **vars(args)}
    rows: list[dict] = []
    if args.append and Path(out).exists():
        rows = [r for r in json.loads(Path(out).read_text())["rows"] if r.get("method") not in args.methods]
    for method in args.methods:
        rows += bench_method(method, args)
        Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print_table(rows)
    print(f"wrote {out}")


def print_table(rows: list[dict]) -> None:
    print("\n| method | rate (req/s) | done | out tok/s | TTFT p50 / p99 s | TPOT p50 / p99 ms | idle share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "output_throughput" not in r:
            print(f"| {r['method']} | {r['rate']} | 0 | errors: {r.get('errors')} | | | |")
            continue
        print(f"| {r['method']} | {r['rate']} | {r['completed']} | {r['output_throughput']:.1f} | "
              f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | "
              f"{r['idle_share']:.3f} |")


if __name__ == "__main__":
    main()
