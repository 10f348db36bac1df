"""``specattn serve``: a real uvicorn server on a loopback port over the shipped SmolLM2 pair, driven by the official
``openai`` client (and raw HTTP where a client would refuse to send the mistake).

What a request gets must be what the runtime gives alone: greedy completions (plain and chat, streamed and not)
equal ``rt.generate`` on the same prompt, also under load -- 32 concurrent streams of different lengths, a quarter
of them leaving mid-stream -- with every page back in the pool afterwards and ``/health`` answering throughout.
Bad requests get OpenAI's 400 body and change nothing; a full queue answers 503 with ``Retry-After``; a step that
fails answers 500 to that step's requests only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from specattn_runtime import SpecAttnRuntime  # noqa: E402
from specattn_runtime.serve import create_app  # noqa: E402
from specattn_runtime.serve.text import TextStream  # noqa: E402

from artifact_factory import make_artifact  # noqa: E402

K = 1  # drafted tokens per step: the speculative path at the least CPU time per token
MODEL = "smollm2-test"
FAIL_MAX_TOKENS = 13  # a request asking for exactly this many tokens makes the step hook raise (forced failure)
TEXT = ("The printing press was invented in the fifteenth century by Johannes Gutenberg, a goldsmith from Mainz. "
        "Movable metal type made books cheap enough for merchants and students, and within fifty years presses "
        "were at work in more than two hundred cities across Europe, printing bibles, grammars and pamphlets.")


def failing_step(running):
    if any(s.max_new_tokens == FAIL_MAX_TOKENS for s in running):
        raise RuntimeError("forced failure inside a step")


class Server:
    """uvicorn in a thread on a loopback socket the test bound itself (port 0: a free one)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def served(quick_pair):
    """(server, eager reference runtime, the served runtime): SmolLM2-135M + its early exit, sparse at p 0.7."""
    from specattn_runtime.hooks import register
    from specattn_runtime.models import load_causal_lm, load_tokenizer

    name = register()
    draft = load_causal_lm(quick_pair[0], attn_implementation=name)
    target = load_causal_lm(quick_pair[1], attn_implementation=name)
    tok = load_tokenizer(quick_pair[1])
    art = dataclasses.replace(make_artifact(n_t=30, n_d=10, dense=2), top_p=torch.tensor([1.0, 1.0] + [0.7] * 28))
    eager = SpecAttnRuntime(art, draft, target, tok, engine="eager")
    rt = SpecAttnRuntime(art, draft, target, tok, engine="static")
    app = create_app(rt, model_name=MODEL, k=K, max_batch=8, kv_memory_gb=0.25, max_model_len=320,
                     max_waiting=64, step_hook=failing_step)
    server = Server(app)
    yield server, eager, rt
    server.close()


def reference(eager, ids: list[int], n: int) -> tuple[str, int]:
    """What the runtime generates alone, greedily: (text, tokens)."""
    out = eager.generate(ids, n, k=K, temperature=0.0)
    return eager.tokenizer.decode(out.tokens, skip_special_tokens=True), len(out.tokens)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def pages_all_free(rt, timeout: float = 10.0) -> bool:
    alloc = rt._pool.allocator
    deadline = time.time() + timeout
    while alloc.n_free != alloc.capacity and time.time() < deadline:
        time.sleep(0.05)
    return alloc.n_free == alloc.capacity


@pytest.mark.slow
def test_completions_and_chat_equal_generate(served):
    """Plain and chat, streamed and not, text and token-id prompts, a stop string, seeded sampling: sent together
    (the server batches them), each checked against the runtime alone."""
    server, eager, rt = served
    tok = eager.tokenizer
    prompt, n = TEXT[:120], 8
    ids = tok(prompt).input_ids
    want, n_want = reference(eager, ids, n)
    messages = [{"role": "user", "content": "Name one use of a printing press."}]
    chat_ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False).input_ids
    chat_want, chat_n = reference(eager, chat_ids, n)
    stop = want[3:6]
    base = dict(model=MODEL, max_tokens=n, temperature=0)
    seeded = dict(model=MODEL, prompt=TEXT[:60], max_tokens=4, temperature=0.9, top_p=0.9, seed=5)

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)

        async def streamed(coro):
            return [part async for part in await coro]

        calls = [c.completions.create(prompt=prompt, **base),
                 streamed(c.completions.create(prompt=prompt, stream=True, **base)),
                 c.completions.create(prompt=ids, **base),  # token ids in
                 c.chat.completions.create(messages=messages, **base),
                 streamed(c.chat.completions.create(messages=messages, stream=True, **base)),
                 c.completions.create(prompt=prompt, stop=[stop], **base),
                 streamed(c.completions.create(prompt=prompt, stop=stop, stream=True, **base)),
                 c.completions.create(**seeded), c.completions.create(**seeded)]
        out = await asyncio.gather(*calls)
        models = await c.models.list()
        await c.close()
        return out, models

    (plain, parts, by_ids, chat, chat_parts, stopped, stop_parts, s1, s2), models = asyncio.run(main())
    assert plain.choices[0].text == want and plain.usage.completion_tokens == n_want
    assert plain.usage.prompt_tokens == len(ids) and plain.object == "text_completion"
    assert "".join(p.choices[0].text for p in parts) == want
    assert parts[-1].choices[0].finish_reason in ("stop", "length") and parts[-1].usage.completion_tokens == n_want
    assert by_ids.choices[0].text == want
    assert chat.choices[0].message.content == chat_want and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == chat_n and chat.usage.prompt_tokens == len(chat_ids)
    assert chat_parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in chat_parts) == chat_want
    assert chat_parts[-1].usage.total_tokens == len(chat_ids) + chat_n
    # a stop string cuts the text before it (checked on the decoded text), finish_reason "stop"
    assert stopped.choices[0].text == want[: want.index(stop)] and stopped.choices[0].finish_reason == "stop"
    assert "".join(p.choices[0].text for p in stop_parts) == stopped.choices[0].text
    assert s1.choices[0].text == s2.choices[0].text  # seeded sampling: the same seed, the same text
    assert [m.id for m in models.data] == [MODEL]
    assert pages_all_free(rt)


@pytest.mark.slow
def test_load_with_disconnects(served):
    """32 concurrent streams, 8 prompt lengths, every 4th client leaving after its first chunk."""
    server, eager, rt = served
    tok = eager.tokenizer
    lengths = [8, 20, 33, 47, 60, 75, 90, 110]
    prompts = [tok.decode(tok(TEXT).input_ids[:n]) for n in lengths]
    n_new = 6
    refs = {p: reference(eager, tok(p).input_ids, n_new) for p in prompts}
    health: list[int] = []

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        done = asyncio.Event()

        async def poll_health():
            async with httpx.AsyncClient(timeout=30) as h:
                while not done.is_set():
                    health.append((await h.get(server.url + "/health")).status_code)
                    await asyncio.sleep(0.2)

        async def one(i: int):
            prompt, leaves = prompts[i % len(prompts)], i % 4 == 3
            # a client that leaves asks for far more than the test waits for: only a cancellation frees its pages
            stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=200 if leaves else n_new,
                                                temperature=0, stream=True)
            text, last = [], None
            async for part in stream:
                text.append(part.choices[0].text)
                last = part
                if leaves:  # mid-stream
                    await stream.close()
                    return i, None
            return i, ("".join(text), last.usage.completion_tokens, last.choices[0].finish_reason)

        poller = asyncio.create_task(poll_health())
        results = await asyncio.gather(*(one(i) for i in range(32)))
        done.set()
        await poller
        await c.close()
        return results

    results = asyncio.run(main())
    assert sorted(i for i, _ in results) == list(range(32))  # none lost, none duplicated
    completed = [(i, r) for i, r in results if r is not None]
    assert len(completed) == 24
    for i, (text, n, _) in completed:
        assert (text, n) == refs[prompts[i % len(prompts)]], f"client {i}"
    assert health and set(health) == {200}
    assert pages_all_free(rt)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'specattn_requests_total{endpoint="completions",status="200"}' in metrics
    assert "specattn_free_pages" in metrics and "specattn_step_seconds_count" in metrics


BAD = [  # (body or raw bytes, param)
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": float("nan")}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "top_p": 1.5}, "top_p"),
    ({"model": "gpt-4", "prompt": "hi", "max_tokens": 4}, "model"),
    ({"model": MODEL, "prompt": "", "max_tokens": 4}, "prompt"),
    ({"model": MODEL, "prompt": [], "max_tokens": 4}, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 10**7], "max_tokens": 4}, "prompt"),
    ({"model": MODEL, "prompt": [1, -2], "max_tokens": 4}, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "n": 2}, "n"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "stop": 5}, "stop"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 100000}, "max_tokens"),  # can never fit: 400 at once
    ({"model": MODEL, "prompt": TEXT * 6, "max_tokens": 4}, "max_tokens"),
]


@pytest.mark.slow
def test_bad_requests_get_400_and_the_next_request_succeeds(served):
    server, eager, rt = served
    with httpx.Client(base_url=server.url, timeout=60) as h:
        for body, param in BAD:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = h.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
            assert err["param"] == param and err["message"], (body, err)
            ok = h.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2,
                                                 "temperature": 0})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": 3}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert h.get("/v1/nowhere").json()["error"]["code"] == "not_found"
    with pytest.raises(openai.BadRequestError, match="not served here"):  # the official client sees a 400 too
        client(server).completions.create(model="other", prompt="hi", max_tokens=2)
    assert pages_all_free(rt)


@pytest.mark.slow
def test_a_failed_step_answers_500_to_its_requests_only(served):
    """The greedy runner's step fails; a sampled request (the other runner's steps) and later requests go on."""
    server, eager, rt = served

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as h:
            sampled = h.post("/v1/completions", json={"model": MODEL, "prompt": TEXT[:80], "max_tokens": 12,
                                                      "temperature": 0.8, "seed": 1})
            doomed = h.post("/v1/completions", json={"model": MODEL, "prompt": TEXT[:50],
                                                     "max_tokens": FAIL_MAX_TOKENS, "temperature": 0})
            doomed_stream = h.post("/v1/completions", json={"model": MODEL, "prompt": TEXT[:40], "stream": True,
                                                            "max_tokens": FAIL_MAX_TOKENS, "temperature": 0})
            return await asyncio.gather(sampled, doomed, doomed_stream)

    sampled, doomed, doomed_stream = asyncio.run(main())
    assert sampled.status_code == 200 and sampled.json()["usage"]["completion_tokens"] == 12
    for r in (doomed, doomed_stream):
        if r.status_code == 200:  # the stream had sent its first token: the error comes inside the stream
            assert '"type": "server_error"' in r.text and r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "forced failure" in r.json()["error"]["message"]
    assert pages_all_free(rt)
    ok = client(server).completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.slow
def test_a_full_queue_answers_503_with_retry_after(served):
    server, eager, rt = served
    engine = server.server.config.app.state.engine
    engine.max_waiting = 1
    try:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as h:
                return await asyncio.gather(*(h.post("/v1/completions", json={
                    "model": MODEL, "prompt": TEXT[:30], "max_tokens": 6, "temperature": 0}) for _ in range(12)))

        answers = asyncio.run(main())
    finally:
        engine.max_waiting = 64
    codes = [r.status_code for r in answers]
    assert 503 in codes and 200 in codes, codes
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
    assert pages_all_free(rt)


def test_only_the_serve_package_imports_the_http_stack():
    """FastAPI, uvicorn, starlette and prometheus-client stay inside ``specattn_runtime/serve`` (the serve extra):
    the runtime and its CLI import without them."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    http = {"fastapi", "uvicorn", "starlette", "prometheus_client"}
    root = Path(__file__).resolve().parents[1] / "specattn_runtime"
    offenders = []
    for path in root.rglob("*.py"):
        if "serve" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in http]
    assert not offenders, offenders
    code = ("import sys, specattn_runtime, specattn_runtime.cli, specattn_runtime.batched; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {http!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Chars:
    """A tokenizer whose tokens are characters (ids are code points): stop strings without a model."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("text, stop, want", [
    ("hello world", ["wor"], "hello "),
    ("hello world", ["xyz"], "hello world"),
    ("abcabc", ["ca", "bc"], "a"),
])
def test_text_stream_cuts_at_the_first_stop_string_whatever_the_steps(text, stop, want):
    for step in (1, 2, 5):
        s = TextStream(_Chars(), stop)
        parts = [s.add([ord(c) for c in text[i : i + step]]) for i in range(0, len(text), step)]
        parts.append(s.finish())
        assert "".join(parts) == want, step
        assert s.stopped == (want != text)
        if s.stopped:  # the tokens it took to reach the stop string: where the first complete one ends
            assert s.n_tokens == min(text.index(x) + len(x) for x in stop if x in text)
