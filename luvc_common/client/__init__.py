"""Python client for applications: the LLM service (and the encoder) over gRPC."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc

from luvc_common.config import FRAME_SUFFIXES, REQUEST_ID, MiB
from luvc_common.proto import luvc_pb2, luvc_pb2_grpc


@dataclass
class ClientOptions:
    """How to reach a LUVC service."""

    token: str | None = None
    """Bearer token, when the server requires one."""
    tls_ca: str | None = None
    """PEM CA bundle; set to use TLS."""
    application: str | None = None
    """Ray Serve application to route to behind Ray's gRPC proxy; by default "llm" for Generate and
    "encoder" for Encode (the names `luvc serve llm --ray` and deploy/ray/serve.yaml use). Plain
    servers ignore it."""
    max_message_bytes: int = 64 * MiB
    """Largest message sent or received."""
    metadata: list[tuple[str, str]] = field(default_factory=list)
    """Extra metadata sent with every call."""


class LUVCClient:
    def __init__(self, target: str, options: ClientOptions | None = None):
        self.options = options or ClientOptions()
        opts = [("grpc.max_send_message_length", self.options.max_message_bytes), ("grpc.max_receive_message_length", self.options.max_message_bytes)]
        if self.options.tls_ca:
            with open(self.options.tls_ca, "rb") as f:
                self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(f.read()), opts)
        else:
            self.channel = grpc.insecure_channel(target, opts)
        self.llm = luvc_pb2_grpc.LLMStub(self.channel)
        self.encoder = luvc_pb2_grpc.EncoderStub(self.channel)

    def _metadata(self, request_id: str | None, application: str) -> list[tuple[str, str]]:
        md = [(REQUEST_ID, request_id or uuid.uuid4().hex[:16]), ("application", self.options.application or application)]
        if self.options.token:
            md.append(("authorization", f"Bearer {self.options.token}"))
        return md + self.options.metadata

    def stream(
        self,
        prompt: str,
        media: list[luvc_pb2.Media] = (),
        *,
        visual: luvc_pb2.EncodeResponse | None = None,
        method: str = "",
        max_new_tokens: int = 0,
        wire_dtype: str = "",
        ignore_eos: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Iterator[luvc_pb2.GenerateResponse]:
        """Stream GenerateResponse chunks; the last carries the stats. Raises grpc.RpcError."""
        request = luvc_pb2.GenerateRequest(prompt=prompt, media=list(media), visual=visual, method=method,
                                           max_new_tokens=max_new_tokens, wire_dtype=wire_dtype, ignore_eos=ignore_eos)
        return self.llm.Generate(request, timeout=timeout, metadata=self._metadata(request_id, "llm"))

    def generate(self, prompt: str, media: list[luvc_pb2.Media] = (), **kwargs) -> luvc_pb2.GenerateStats:
        """The whole answer's stats (text, token ids, visual-token counts, payload, timings)."""
        stats = None
        for chunk in self.stream(prompt, media, **kwargs):
            if chunk.HasField("stats"):
                stats = chunk.stats
        if stats is None:
            raise RuntimeError("stream ended without stats")
        return stats

    def encode(self, media: list[luvc_pb2.Media], method: str = "", wire_dtype: str = "", timeout: float | None = None,
               request_id: str | None = None) -> luvc_pb2.EncodeResponse:
        request = luvc_pb2.EncodeRequest(media=list(media), method=method, wire_dtype=wire_dtype)
        return self.encoder.Encode(request, timeout=timeout, metadata=self._metadata(request_id, "encoder"))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_health(target: str, service: str = "", timeout: float = 3.0) -> str:
    """SERVING / NOT_SERVING / an error code name for `service` ("" = the whole server). Asks
    grpc.health.v1; behind Ray's gRPC proxy (which does not implement it) asks Ray's Healthz."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                return e.code().name
        healthz = channel.unary_unary("/ray.serve.RayServeAPIService/Healthz", lambda b: b, lambda b: b)
        try:
            healthz(b"", timeout=timeout)  # an empty HealthzRequest; any OK answer means healthy
            return "SERVING"
        except grpc.RpcError as e:
            return e.code().name


def image_file(path: str | Path) -> luvc_pb2.Media:
    """An image file as a request item (sent encoded; the encoder decodes it)."""
    return luvc_pb2.Media(image=Path(path).read_bytes())


def video_dir(path: str | Path) -> luvc_pb2.Media:
    """A directory of frame images, in name order, as a video item."""
    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    return luvc_pb2.Media(video=luvc_pb2.Video(frames=[f.read_bytes() for f in files]))


def stats_to_json(stats: luvc_pb2.GenerateStats) -> dict:
    """The `luvc generate --json` fields plus payload bytes."""
    return {
        "model": stats.model,
        "method": stats.method,
        "request_id": stats.request_id,
        "prompt_ids": list(stats.prompt_ids),
        "token_ids": list(stats.token_ids),
        "text": stats.text,
        "visual_tokens": {"vit_patches": stats.vit_patches, "encoder_out": stats.encoder_out, "llm_per_layer": list(stats.llm_per_layer)},
        "payload_bytes": stats.payload_bytes,
        "payload_bytes_uncompressed": stats.payload_bytes_uncompressed,
        "timings_ms": dict(stats.timings_ms),
    }
