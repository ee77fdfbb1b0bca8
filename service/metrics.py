"""Prometheus metrics of one app, in its own registry (so several apps can live in one process,
as they do in the tests)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        # POST requests (queries, embeds, writes) being handled now, kept by RequestMetrics:
        # the encode batcher waits for company only when some may come.
        self.in_flight = 0
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "cots_request_seconds",
            "Request latency by route template, method and status",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "cots_stage_seconds",
            "Time of one query pipeline stage (tokenise, preprocess, encode, search, hydrate) "
            "per call; a batched call counts once",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cots_batch_size",
            "Queries per encoder or FAISS call",
            ["batcher"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cots_queue_depth",
            "Queries waiting in a batcher",
            ["batcher"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "cots_rejected_total",
            "Queries refused with 503 because a batcher queue was full",
            ["batcher"],
            registry=self.registry,
        )
        self.cache = Counter(
            "cots_cache_total",
            "Query-embedding cache look-ups by result (hit, miss, error)",
            ["backend", "result"],
            registry=self.registry,
        )
        self.index_version = Gauge(
            "cots_index_version",
            "Live version of each loaded collection",
            ["collection"],
            registry=self.registry,
        )
        self.index_items = Gauge(
            "cots_index_items",
            "Live items of each loaded collection",
            ["collection"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "cots_index_reloads_total",
            "Collection versions loaded after start-up, by outcome",
            ["collection", "outcome"],
            registry=self.registry,
        )
        self.collections_unavailable = Gauge(
            "cots_collections_unavailable",
            "Collections this replica cannot serve (damaged, missing or foreign files; "
            "/readyz names each with its reason)",
            registry=self.registry,
        )
        self.partial_results = Counter(
            "cots_partial_results_total",
            "Searches of a sharded collection answered without one of its shards (no replica "
            "answered within shard_timeout_s); the answer says which (partial, missing_shards)",
            ["collection"],
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "cots_redis_up", "1 when Redis answers, 0 when it does not", registry=self.registry
        )

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages.labels(name).observe(time.perf_counter() - start)
