"""Metrics of one service process: Prometheus at /metrics on `--metrics-port`, or, in a Ray Serve
replica, Ray's metrics agent (each node's metrics export port).

Each service owns one `Metrics` (its own registry, so several services in one process never clash);
the servicer base records every RPC's status and latency, the gate its queue, and the services what
only they know (tokens, visual tokens per layer, payload bytes, KV cache). In a replica the same
instruments are `ray.util.metrics` ones behind prometheus_client's `labels()` interface, so services
record the same way on both; Ray adds the `ray_` prefix and its own tags (node, worker) to every series.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RAY_GAUGE_PERIOD_S = 1.0
"""How often a replica reads its gauges that are set by a function (Prometheus reads them when scraped)."""


class Metrics:
    def __init__(self, service: str, on_ray: bool = False):
        self.service = service
        self.registry = r = None if on_ray else CollectorRegistry()
        make = _RayInstruments(service).make if on_ray else lambda cls, *a, **k: cls(*a, registry=r, **k)
        self.requests = make(Counter, "luvc_requests", "RPCs finished, by method and status code", ["service", "method", "code"])
        self.latency = make(Histogram, "luvc_request_seconds", "RPC latency from arrival to the last reply", ["service", "method"],
                            buckets=LATENCY_BUCKETS)
        self.queue_depth = make(Gauge, "luvc_queue_depth", "requests waiting for the model", ["service"])
        self.running = make(Gauge, "luvc_running", "requests the model is computing", ["service"])
        self.batch_size = make(Histogram, "luvc_batch_size", "per request, the requests prefilled together with it", ["service"],
                               buckets=BATCH_BUCKETS)
        self.ttft = make(Histogram, "luvc_time_to_first_token_seconds", "arrival to the first generated token", ["method"],
                         buckets=LATENCY_BUCKETS)
        self.prompt_tokens = make(Counter, "luvc_prompt_tokens", "prompt tokens prefilled (visual placeholders included)", ["method"])
        self.generated_tokens = make(Counter, "luvc_generated_tokens", "tokens generated", ["method"])
        self.visual_tokens = make(Counter, "luvc_visual_tokens", "visual tokens entering each LLM layer (layer 0: the LLM input)",
                                  ["method", "layer"])
        self.encoder_tokens = make(Counter, "luvc_encoder_tokens", "visual tokens the encoder returned", ["method"])
        self.payload_bytes = make(Counter, "luvc_payload_bytes", "visual-token bytes crossing the encoder -> LLM wire", ["service"])
        self.kv_cache_bytes = make(Gauge, "luvc_kv_cache_bytes", "KV-cache bytes of the running batch", ["service"])

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on a daemon thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

    def request_done(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(self.service, method, code).inc()
        self.latency.labels(self.service, method).observe(seconds)


class _RayInstruments:
    """Makes `ray.util.metrics` instruments with prometheus_client's `labels(*values)` interface; gauges
    set by a function are read and pushed every RAY_GAUGE_PERIOD_S by one daemon thread."""

    def __init__(self, service: str):
        self.service = service
        self.readers: list[tuple[Callable[[], float], Callable[[float], None]]] = []

    def make(self, kind: type, name: str, doc: str, labels: list[str], buckets=None) -> "_RayMetric":
        from ray.util import metrics as ray_metrics

        cls = {Counter: ray_metrics.Counter, Gauge: ray_metrics.Gauge, Histogram: ray_metrics.Histogram}[kind]
        extra = {"boundaries": list(buckets)} if buckets else {}
        return _RayMetric(self, cls(name, description=doc, tag_keys=tuple(labels), **extra), labels)

    def poll(self, read: Callable[[], float], write: Callable[[float], None]) -> None:
        self.readers.append((read, write))
        if len(self.readers) == 1:
            threading.Thread(target=self._push, name=f"{self.service}-metrics", daemon=True).start()

    def _push(self) -> None:
        while True:
            for read, write in list(self.readers):
                try:
                    write(read())
                except Exception:  # noqa: BLE001 - one failing reader must not stop the other gauges
                    pass
            time.sleep(RAY_GAUGE_PERIOD_S)


class _RayMetric:
    def __init__(self, instruments: _RayInstruments, instrument, keys: list[str]):
        self.instruments, self.instrument, self.keys = instruments, instrument, keys

    def labels(self, *values: str) -> "_RaySeries":
        return _RaySeries(self, dict(zip(self.keys, values)))


class _RaySeries:
    def __init__(self, metric: _RayMetric, tags: dict[str, str]):
        self.metric, self.tags = metric, tags

    def inc(self, value: float = 1.0) -> None:
        if value > 0:  # Ray refuses 0
            self.metric.instrument.inc(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.metric.instrument.observe(value, tags=self.tags)

    def set(self, value: float) -> None:
        self.metric.instrument.set(value, tags=self.tags)

    def set_function(self, read: Callable[[], float]) -> None:
        self.metric.instruments.poll(read, self.set)
