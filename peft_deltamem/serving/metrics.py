"""Prometheus metrics of ``deltamem serve`` (``GET /metrics``), in a registry of the app's own."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """Requests, tokens in and out, batch sizes, queue wait, memory writes and rewinds, sessions, open streams."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, store: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "deltamem_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("deltamem_prompt_tokens", "Tokens in the prompts (the windows)", registry=r)
        self.completion_tokens = Counter("deltamem_completion_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram(
            "deltamem_batch_size", "Answers per generation batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.queue_wait = Histogram("deltamem_queue_wait_seconds", "Wait before a generation batch starts", registry=r)
        self.memory_writes = Counter("deltamem_memory_writes", "Write groups written into memories", registry=r)
        self.tokens_written = Counter("deltamem_tokens_written", "Tokens written into memories", registry=r)
        self.rewinds = Counter("deltamem_rewinds", "Requests that rewound a session's memory", registry=r)
        self.open_streams = Gauge("deltamem_open_streams", "Streaming responses in progress", registry=r)
        sessions = Gauge("deltamem_sessions", "Sessions in the store", registry=r)
        sessions.set_function(store.count)

    def observe(self, completion: Any) -> None:
        """Count one generated answer (a :class:`~peft_deltamem.serving.engine.Completion`)."""
        self.completion_tokens.inc(completion.completion_tokens)
        self.batch_size.observe(completion.batch_size)
        self.queue_wait.observe(completion.queue_wait_s)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
