"""``specattn serve``: an OpenAI-compatible HTTP server with continuous batching over the batched engine.

The only part of ``specattn_runtime`` that imports FastAPI, uvicorn and prometheus-client (the ``serve`` extra):
nothing else imports this package. ``create_app(rt, ...)`` builds the app; ``python -m specattn_runtime.cli serve``
(``specattn serve``) loads a runtime and runs it under uvicorn.

Modules: ``protocol.py`` (request checks, OpenAI error bodies and response objects), ``text.py`` (incremental
detokenisation with stop strings), ``engine_loop.py`` (the engine thread), ``metrics.py`` (Prometheus), ``app.py``.
"""

from .app import create_app, run

__all__ = ["create_app", "run"]
