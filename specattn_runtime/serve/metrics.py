"""Prometheus metrics of one server (``GET /metrics``, text format), on a registry of its own.

A registry per app rather than the process-wide default: two servers in one process (tests, benchmarks) keep
separate counts. Gauges read the engine's state when scraped, so they are never stale.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("specattn_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("specattn_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("specattn_generation_tokens", "Tokens generated", registry=r)
        self.accepted_length = Histogram("specattn_accepted_length", "Tokens per verification step, per request",
                                         buckets=(1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12), registry=r)
        self.kv_read_fraction = Histogram("specattn_kv_read_fraction",
                                          "Share of the KV rows the target read (mean over layers), per request",
                                          buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                                          registry=r)
        self.step_seconds = Histogram("specattn_step_seconds", "Wall time of one engine step (all its sequences)",
                                      buckets=_LATENCY, registry=r)
        self.ttft_seconds = Histogram("specattn_time_to_first_token_seconds", "Request arrival to first token",
                                      buckets=_LATENCY, registry=r)
        self.queue_depth = Gauge("specattn_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("specattn_running_sequences", "Sequences in the running batch", registry=r)
        self.free_pages = Gauge("specattn_free_pages", "Free pages of the paged KV pool", registry=r)
        self.busy_seconds = Gauge("specattn_engine_busy_seconds", "Seconds in steps and prefills while loaded",
                                  registry=r)
        self.loaded_seconds = Gauge("specattn_engine_loaded_seconds", "Seconds with sequences running", registry=r)

    def watch(self, engine, allocator) -> None:
        """Read the gauges from the engine loop and the page allocator at scrape time."""
        self.queue_depth.set_function(lambda: engine.n_waiting)
        self.running.set_function(lambda: engine.n_running)
        self.free_pages.set_function(lambda: allocator.n_free)
        self.busy_seconds.set_function(lambda: engine.busy_seconds)
        self.loaded_seconds.set_function(lambda: engine.loaded_seconds)

    def finished(self, stats) -> None:
        """A request that ran to its end: its speculation statistics (tokens are counted as they go)."""
        if stats.steps:
            self.accepted_length.observe(stats.mean_accepted_length)
            kv = stats.kv_read_fraction
            if kv:
                self.kv_read_fraction.observe(sum(kv) / len(kv))
