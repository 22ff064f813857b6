"""Prometheus metrics of the server (``GET /metrics``, text format 0.0.4).

Request outcomes, HTTP errors, TTFT / TPOT / end-to-end histograms (measured in
the server, from the request's submission to the engine to the token's arrival
in the HTTP handler), token counters (tokens/s = ``rate(wicore_generation_tokens_total[1m])``;
also a gauge over the last 10 s), and, read at scrape time from the engine
thread's snapshot, queue length, running batch, KV pages and memory per tier.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # no *_created series: keeps the text short
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]], rate: Callable[[], float]) -> None:
        self.snapshot = snapshot
        self.rate = rate

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.snapshot()
        for name, key, doc in (("wicore_requests_waiting", "waiting", "requests queued"),
                               ("wicore_requests_running", "running", "requests in the running batch"),
                               ("wicore_kv_pages_used", "kv_pages_used", "KV cache pages in use"),
                               ("wicore_kv_pages_total", "kv_pages_total", "KV cache pages")):
            yield GaugeMetricFamily(name, doc, value=float(s.get(key, 0)))
        used = GaugeMetricFamily("wicore_memory_used_bytes", "memory in use per tier", labels=["tier"])
        cap = GaugeMetricFamily("wicore_memory_capacity_bytes", "memory capacity per tier", labels=["tier"])
        for tier, v in s.get("tiers", {}).items():
            used.add_metric([tier], float(v["used_bytes"]))
            cap.add_metric([tier], float(v["capacity_bytes"]))
        yield used
        yield cap
        yield GaugeMetricFamily("wicore_generation_tokens_per_second", "output tokens/s over the last 10 s",
                                value=self.rate())


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("wicore_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.http_errors = Counter("wicore_http_errors", "error responses by status code", ["code"], registry=r)
        self.prompt_tokens = Counter("wicore_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.gen_tokens = Counter("wicore_generation_tokens", "output tokens sent", registry=r)
        self.ttft = Histogram("wicore_time_to_first_token_seconds", "submission to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("wicore_time_per_output_token_seconds", "mean gap between output tokens",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("wicore_e2e_request_latency_seconds", "submission to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._window: deque[tuple[float, int]] = deque()
        r.register(_EngineCollector(snapshot, self.tokens_per_second))

    def tokens(self, n: int) -> None:
        self.gen_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._window.append((now, n))
            while self._window and self._window[0][0] < now - 10.0:
                self._window.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - 10.0:
                self._window.popleft()
            return sum(n for _, n in self._window) / 10.0

    def latency(self, ttft: float | None, tpot: float | None, e2e: float | None) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        if e2e is not None:
            self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
