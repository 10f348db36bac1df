"""The HTTP layer: a FastAPI app speaking the OpenAI API over one :class:`SpecAttnRuntime`'s batched engine.

``create_app(rt, ...)`` sizes the paged KV pool once, starts the engine thread (``engine_loop.py``) with the app
and stops it with the app. A request is checked (``protocol.py``; 400 with OpenAI's error body), tokenised (chat:
the tokenizer's chat template), refused at once when it can never fit (prompt + ``max_tokens`` over the context,
the page table or the pool: 400) or when the waiting queue is full (503 + ``Retry-After``), and submitted. Its
handler then turns the engine's token events into text (``text.py``) -- one JSON response, or server-sent events in
OpenAI's chunk format ending ``data: [DONE]``. A streamed response commits its status with the first token, so a
step that fails before it still answers 500; a client that goes away cancels its sequence and frees its pages.

The runtime belongs to the server while it runs: do not call ``generate_batch`` on it meanwhile (same pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import rng
from ..batched import PAGE_SIZE, runner_for
from ..engine.batch import BUCKETS
from .engine_loop import EngineLoop, Job, QueueFull
from .metrics import Metrics
from .protocol import APIError, GenerationRequest, bad, chunk, completion, new_id, parse_chat, parse_completion, \
    parse_json, sse, usage
from .text import TextStream

log = logging.getLogger("specattn.serve")
RETRY_AFTER_S = 1  # what a 503 asks the client to wait
DISCONNECT_POLL_S = 0.5  # how often a waiting, non-streaming request checks that its client is still there


class _ClientGone(Exception):
    pass


class _NoText:
    """The tokenizer of a runtime without one (random-weight benchmarks): token ids in, token ids out, no text."""

    @staticmethod
    def decode(ids, skip_special_tokens=True) -> str:
        return ""


def create_app(rt, *, model_name: str | None = None, k: int = 6, max_batch: int = 8,
               kv_memory_gb: float | None = None, kv_memory_fraction: float | None = None,
               max_model_len: int | None = None, max_waiting: int = 64, prefill_tokens: int | None = None,
               default_max_tokens: int = 256, step_hook=None) -> FastAPI:
    """An OpenAI-compatible app over ``rt`` (a :class:`SpecAttnRuntime`).

    Parameters
    ----------
    model_name : str, optional
        The name clients send as ``model`` (default: the target's ``name_or_path``).
    k : int
        Drafted tokens per step (0: the target alone, autoregressive).
    max_batch : int
        Sequences in one step (per sampling mode: greedy and sampled requests run as separate batches).
    kv_memory_gb, kv_memory_fraction : float, optional
        The paged pool (both models' K/V): GiB, or a share of the free GPU memory (default 0.85 on CUDA; on the
        CPU pass ``kv_memory_gb``). Every request reserves pages for prompt + ``max_tokens`` at admission.
    max_model_len : int, optional
        Longest prompt + generation served (default: the models' context); sets the page-table width, which the
        CPU attention reads in full every step, so a CPU server wants it small.
    max_waiting : int
        Requests waiting for a slot; the next gets 503 with ``Retry-After``.
    prefill_tokens : int, optional
        Tokens per prefill forward (the runner's default when None).
    default_max_tokens : int
        ``max_tokens`` of a chat request that names none (completions default to OpenAI's 16).
    step_hook : callable, optional
        See :class:`EngineLoop` (tests force step failures with it).
    """
    on_cuda = next(rt.target.parameters()).is_cuda
    if kv_memory_gb is None and kv_memory_fraction is None:
        if not on_cuda:
            raise ValueError("on the CPU pass kv_memory_gb (GiB of K/V for the paged pool), e.g. 1.0")
        kv_memory_fraction = 0.85
    context = rt.context_limit(k)
    max_model_len = context if max_model_len is None else int(max_model_len)
    if not 1 < max_model_len <= context:
        raise ValueError(f"max_model_len must lie in [2, {context}] (the models' context), got {max_model_len}")
    pool = rt._batch_pool([], max_batch, kv_memory_gb, kv_memory_fraction)
    max_pages = min(-(-max_model_len // PAGE_SIZE), pool.allocator.capacity)
    limit = min(max_model_len, max_pages * PAGE_SIZE)  # positions one sequence may hold
    models = (rt.target, rt.draft) if k else (rt.target,)
    vocab = min(m.get_input_embeddings().num_embeddings for m in models)
    name = model_name or str(getattr(rt.target.config, "name_or_path", "") or "specattn")
    tokenizer = rt.tokenizer
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    metrics = Metrics()
    engine = EngineLoop(lambda sampling: runner_for(rt, k, sampling, max_batch, max_pages, pool, prefill_tokens),
                        k=k, max_waiting=max_waiting, metrics=metrics, step_hook=step_hook)
    metrics.watch(engine, pool.allocator)

    def warm_up() -> None:
        """Capture the greedy runner's graphs for every batch bucket now, not on the first requests (CUDA)."""
        runner = engine.runners["greedy"] = engine.runner_factory("greedy")
        runner.graphs.capture({min(b, max_batch) for b in BUCKETS})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_cuda:
            await asyncio.to_thread(warm_up)
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="specattn", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.pool, app.state.model_name = engine, metrics, pool, name
    app.state.max_model_len = limit

    def error(e: APIError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(e.status)).inc()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def encode(req: GenerationRequest) -> list[int]:
        if tokenizer is None and (req.messages or isinstance(req.prompt, str) or req.stop):
            raise bad("this server has no tokenizer: send prompts as token ids, without stop strings",
                      "prompt" if not req.stop else "stop", "unsupported")
        if req.messages:
            try:
                text = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # noqa: BLE001 - the template's own complaint (roles out of order, ...)
                raise bad(f"the chat template refused the messages: {e}", "messages", "invalid_value") from None
            return tokenizer(text, add_special_tokens=False).input_ids
        if isinstance(req.prompt, str):
            ids = tokenizer(req.prompt).input_ids
            if not ids:
                raise bad("the prompt tokenizes to no tokens", "prompt", "invalid_value")
            return ids
        for i, t in enumerate(req.prompt):
            if not 0 <= t < vocab:
                raise bad(f"prompt[{i}] is {t}, outside the vocabulary [0, {vocab})", "prompt", "invalid_value")
        return list(req.prompt)

    def job_for(req: GenerationRequest, ids: list[int], chat: bool) -> Job:
        max_tokens = req.max_tokens
        if max_tokens is None:  # chat: up to the default, within what fits; completions: OpenAI's 16
            max_tokens = max(1, min(default_max_tokens, limit - len(ids) - k - 1)) if chat else 16
        need = len(ids) + max_tokens + k + 1  # what the sequence reserves (one step's drafts past the end)
        if need > limit:
            raise bad(f"the prompt's {len(ids)} tokens + max_tokens={max_tokens} (+ {k + 1} positions of one "
                      f"speculative step) exceed the {limit} positions a request may use here (the models' context "
                      f"or --max-model-len); shorten the prompt or ask for fewer tokens", "max_tokens",
                      "context_length_exceeded")
        pages = -(-need // PAGE_SIZE)
        if pages > pool.allocator.capacity:
            raise bad(f"the request needs {pages} KV pages of {PAGE_SIZE} positions, the pool has "
                      f"{pool.allocator.capacity}: ask for fewer tokens, or restart the server with more "
                      "--kv-memory-gb", "max_tokens", "context_length_exceeded")
        seed = rng.new_seed() if req.seed is None else req.seed % 2**62
        return Job(ids, max_tokens, req.temperature, req.top_p, seed, eos, loop=asyncio.get_running_loop())

    async def next_event(job: Job, request: Request, getter: asyncio.Future | None) -> tuple:
        """The job's next event; meanwhile the client is checked, and its leaving cancels the job."""
        getter = getter or asyncio.ensure_future(job.events.get())
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if await request.is_disconnected():
                getter.cancel()
                engine.cancel(job)
                raise _ClientGone

    async def generate(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            req = (parse_chat if chat else parse_completion)(parse_json(await request.body()), name)
            ids = encode(req)
            job = job_for(req, ids, chat)
            try:
                engine.submit(job)
            except QueueFull as e:
                raise APIError(503, f"the server is busy: {e}; retry after {RETRY_AFTER_S} s", None,
                               "queue_full") from None
        except APIError as e:
            return error(e, endpoint)
        metrics.prompt_tokens.inc(len(ids))
        text = TextStream(tokenizer or _NoText(), req.stop)
        try:
            first = await next_event(job, request, None)
        except _ClientGone:
            metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        if first[0] == "error":
            return error(APIError(first[1], first[2]), endpoint)
        metrics.ttft_seconds.observe(time.perf_counter() - job.t_submit)
        rid = new_id(chat)
        metrics.requests.labels(endpoint, "200").inc()
        if req.stream:
            return StreamingResponse(stream(job, text, first, rid, chat, tokenizer is None, req.include_usage),
                                     media_type="text/event-stream")
        return await collect(job, request, text, first, rid, chat, tokenizer is None)

    def apply(event: tuple, job: Job, text: TextStream) -> tuple[str, str | None]:
        """One engine event -> (settled text, finish reason or None); a stop string cancels the sequence."""
        kind = event[0]
        if kind == "tokens":
            metrics.generation_tokens.inc(len(event[1]))
            delta = text.add(event[1])
            if text.stopped:
                engine.cancel(job)
                return delta, "stop"
            return delta, None
        if kind == "done":
            metrics.finished(event[2])
            return text.finish(), event[1]
        raise APIError(event[1], event[2])

    async def collect(job, request, text, event, rid, chat, token_mode):
        parts, finish = [], None
        try:
            while True:
                delta, finish = apply(event, job, text)
                parts.append(delta)
                if finish is not None:
                    break
                event = await next_event(job, request, None)
        except APIError as e:
            return error(e, "chat" if chat else "completions")
        except _ClientGone:
            return Response(status_code=499)
        body = completion(rid, name, "".join(parts), finish, usage(len(job.prompt), text.n_tokens), chat)
        if token_mode:
            body["choices"][0]["token_ids"] = text.ids
        return JSONResponse(body)

    async def stream(job, text, event, rid, chat, token_mode, include_usage):
        finished = False
        try:
            if chat:
                yield sse(chunk(rid, name, None, None, chat, role=True))
            while True:
                seen = len(text.ids)
                try:
                    delta, finish = apply(event, job, text)
                except APIError as e:  # the status is sent already: the error goes in the stream
                    yield sse(e.body())
                    yield sse("[DONE]")
                    finished = True
                    return
                if delta or (token_mode and event[0] == "tokens"):
                    c = chunk(rid, name, delta, None, chat)
                    if token_mode:
                        c["choices"][0]["token_ids"] = text.ids[seen:]
                    yield sse(c)
                if finish is not None:
                    break
                event = await job.events.get()
            use = usage(len(job.prompt), text.n_tokens) if include_usage else None
            yield sse(chunk(rid, name, None, finish, chat, use=use))
            yield sse("[DONE]")
            finished = True
        finally:
            if not finished:  # the client went away mid-stream: its sequence leaves, its pages return
                engine.cancel(job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "specattn",
                                            "max_model_len": limit}]}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        e = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code)
        return JSONResponse(e.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("unhandled error answering %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    return app


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        switch_interval_s: float = 0.001) -> None:
    """Serve ``app`` with uvicorn until interrupted.

    ``switch_interval_s`` sets Python's thread switch interval for the process (default 5 ms): when the engine
    thread comes back from its device wait it needs the GIL, which the event loop's thread (JSON, detokenising)
    would otherwise keep for up to 5 ms -- device time lost on every step under load.
    """
    import sys

    import uvicorn

    sys.setswitchinterval(switch_interval_s)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
