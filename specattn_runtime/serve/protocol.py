"""The OpenAI wire format: request checks that answer 400 with OpenAI's error body, and the response objects.

Everything a request can get wrong is found here, before the engine sees it, and named in the error's ``param``:
bodies that are not JSON objects, wrong types, ``max_tokens`` <= 0, NaN or negative temperatures, ``top_p`` outside
(0, 1], another model's name, empty prompts, token ids outside the vocabulary, ``n`` other than 1, and features
this server does not implement (``logprobs``, ``echo``, ``best_of``, tools) -- refused by name rather than ignored.
Nothing here imports the engine: it is plain data in, plain data out.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass
class GenerationRequest:
    """What the engine needs from a request, checked. ``prompt`` is text or token ids; chat has ``messages``."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    prompt: str | list[int] | None = None
    messages: list[dict] = field(default_factory=list)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _int(body: dict, name: str, minimum: int | None = None, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {value!r} ({_type_name(value)})", name, "invalid_type")
    if minimum is not None and value < minimum:
        raise bad(f"{name} must be >= {minimum}, got {value}", name, "invalid_value")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be a number, got {value!r} ({_type_name(value)})", name, "invalid_type")
    if not math.isfinite(value):
        raise bad(f"{name} must be a finite number, got {value}", name, "invalid_value")
    return float(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > 4:
        raise bad(f"stop takes at most 4 strings, got {len(stop)}", "stop", "invalid_value")
    if any(s == "" for s in stop):
        raise bad("stop strings must not be empty", "stop", "invalid_value")
    return stop


def _unsupported(body: dict) -> None:
    n = _int(body, "n", 1, 1)
    if n != 1:
        raise bad(f"n must be 1 (one choice per request), got {n}", "n", "unsupported")
    best_of = _int(body, "best_of", 1, 1)
    if best_of != 1:
        raise bad(f"best_of must be 1, got {best_of}", "best_of", "unsupported")
    for name in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "response_format", "suffix"):
        if body.get(name) not in (None, False, {}, []):
            raise bad(f"{name} is not supported by this server", name, "unsupported")
    if body.get("echo"):
        raise bad("echo is not supported by this server", "echo", "unsupported")


def _common(body: dict, served_model: str, max_tokens_name: str = "max_tokens", chat: bool = False) -> dict:
    model = body.get("model")
    if not isinstance(model, str):
        raise bad(f"model must be a string naming the served model ({served_model!r}), got {_type_name(model)}",
                  "model", "invalid_type")
    if model != served_model:
        raise bad(f"the model {model!r} is not served here; this server serves {served_model!r}", "model",
                  "model_not_found")
    _unsupported(body)
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise bad(f"temperature must be >= 0 (0 = greedy), got {temperature}", "temperature", "invalid_value")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad(f"top_p must lie in (0, 1], got {top_p}", "top_p", "invalid_value")
    max_tokens = _int(body, max_tokens_name, 1)
    if chat and max_tokens is None:  # the newer name for the same field
        max_tokens = _int(body, "max_completion_tokens", 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad(f"stream must be a boolean, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options", "invalid_type")
    seed = _int(body, "seed")
    return dict(model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                stop=_stop(body), stream=bool(stream), include_usage=bool(options.get("include_usage", True)))


def parse_completion(body: dict, served_model: str) -> GenerationRequest:
    """``POST /v1/completions``: ``prompt`` is a non-empty string or token ids (one prompt per request)."""
    common = _common(body, served_model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt is empty", "prompt", "invalid_value")
    elif isinstance(prompt, list):
        if not prompt:
            raise bad("prompt is empty", "prompt", "invalid_value")
        if all(isinstance(x, (str, list)) for x in prompt):
            raise bad(f"prompt holds {len(prompt)} prompts; this server takes one per request", "prompt",
                      "unsupported")
        for i, x in enumerate(prompt):
            if isinstance(x, bool) or not isinstance(x, int):
                raise bad(f"prompt[{i}] is {x!r}: a prompt of token ids holds integers only", "prompt",
                          "invalid_type")
    else:
        raise bad(f"prompt must be a string or a list of token ids, got {_type_name(prompt)}", "prompt",
                  "invalid_type")
    return GenerationRequest(prompt=prompt, **common)


def parse_chat(body: dict, served_model: str) -> GenerationRequest:
    """``POST /v1/chat/completions``: ``messages`` is a non-empty list of ``{"role", "content"}`` (text content)."""
    common = _common(body, served_model, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages",
                  "invalid_value" if isinstance(messages, list) else "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", "messages", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages", "unsupported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string, got {_type_name(content)}", "messages",
                      "invalid_type")
        out.append({"role": m["role"], "content": content})
    return GenerationRequest(messages=out, **common)


# -- responses -------------------------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish_reason: str, use: dict, chat: bool) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(rid: str, model: str, text: str | None, finish_reason: str | None, chat: bool, role: bool = False,
          use: dict | None = None) -> dict:
    """One streamed chunk; chat's first carries the role, the last (``finish_reason`` set) the usage."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice]}
    if use is not None:
        out["usage"] = use
    return out


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
