"""Prometheus metrics of one service process, served on `--metrics-port` at /metrics.

Each service owns one `Metrics` (its own registry, so several services in one process never clash);
the servicer base records every RPC's status and latency, the gate its queue, and the services what
only they know (tokens, visual tokens per layer, payload bytes, KV cache).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self, service: str):
        self.service = service
        self.registry = r = CollectorRegistry()
        self.requests = Counter("luvc_requests", "RPCs finished, by method and status code", ["service", "method", "code"], registry=r)
        self.latency = Histogram("luvc_request_seconds", "RPC latency from arrival to the last reply", ["service", "method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("luvc_queue_depth", "requests waiting for the model", ["service"], registry=r)
        self.running = Gauge("luvc_running", "requests the model is computing", ["service"], registry=r)
        self.batch_size = Histogram("luvc_batch_size", "per request, the requests prefilled together with it", ["service"], buckets=BATCH_BUCKETS, registry=r)
        self.ttft = Histogram("luvc_time_to_first_token_seconds", "arrival to the first generated token", ["method"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("luvc_prompt_tokens", "prompt tokens prefilled (visual placeholders included)", ["method"], registry=r)
        self.generated_tokens = Counter("luvc_generated_tokens", "tokens generated", ["method"], registry=r)
        self.visual_tokens = Counter("luvc_visual_tokens", "visual tokens entering each LLM layer (layer 0: the LLM input)",
                                     ["method", "layer"], registry=r)
        self.encoder_tokens = Counter("luvc_encoder_tokens", "visual tokens the encoder returned", ["method"], registry=r)
        self.payload_bytes = Counter("luvc_payload_bytes", "visual-token bytes crossing the encoder -> LLM wire", ["service"], registry=r)
        self.kv_cache_bytes = Gauge("luvc_kv_cache_bytes", "KV-cache bytes of the running batch", ["service"], registry=r)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on a daemon thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

    def request_done(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(self.service, method, code).inc()
        self.latency.labels(self.service, method).observe(seconds)
