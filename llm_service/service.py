"""The LLM service: prompt plus media (or precomputed visual tokens) in, streamed text out."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import grpc
from tokenizers.decoders import DecodeStream
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_service.config import LLMConfig
from luvc_common.config import REQUEST_ID

from luvc_common.compression.methods import method_config
from luvc_common.serving.messages import encoded_from_proto, uncompressed_payload_bytes
from luvc_common.engine.batching import BatchingEngine, EngineRequest, Output
from luvc_common.engine.pipeline import EncodedMedia, GenerateResult, TextGenerator
from luvc_common.errors import PromptError, shorten
from luvc_common.proto import luvc_pb2, luvc_pb2_grpc
from luvc_common.serving.metrics import Metrics
from luvc_common.serving.runtime import Call, Gate, ServerConfig, ServiceError, ServicerBase, get_logger, log
from luvc_common.serving.wire import wire_dtype

SERVICE_NAME = luvc_pb2.DESCRIPTOR.services_by_name["LLM"].full_name


class LLMService:
    """Transport-independent LLM stage: call `load()` once, then iterate `generate()` per request."""

    def __init__(self, config: LLMConfig, server: ServerConfig, on_ray: bool = False):
        self.config = config
        self.server = server
        self.metrics = Metrics("llm", on_ray)
        self.gate = Gate(server)
        self.logger = get_logger("llm")
        self.generator: TextGenerator | None = None
        self.batcher: BatchingEngine | None = None
        self._encoder_channel: grpc.aio.Channel | None = None

    def load(self) -> None:
        self.generator = TextGenerator(self.config.model, self.config.limits)
        nothing = EncodedMedia.empty(self.generator.engine.config.text_config.hidden_size)
        self.generator.generate("warm up", nothing, method_config("none"), 2)  # first-call costs before SERVING
        self.batcher = BatchingEngine(self.generator.engine, self.config.max_batch, self.config.max_batch_tokens)
        for gauge, read in ((self.metrics.queue_depth, lambda: self.batcher.load[0]), (self.metrics.running, lambda: self.batcher.load[1]),
                            (self.metrics.kv_cache_bytes, lambda: self.batcher.kv_cache_bytes)):
            gauge.labels("llm").set_function(read)  # read when scraped

    def _channel(self) -> grpc.aio.Channel:
        if self._encoder_channel is None:  # channels bind to the running event loop: create lazily
            # reconnect quickly after an encoder restart instead of gRPC's default backoff of up to 2 min
            options = [*self.server.channel_options(), ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
            if self.config.encoder_tls_ca:
                with open(self.config.encoder_tls_ca, "rb") as f:
                    self._encoder_channel = grpc.aio.secure_channel(self.config.encoder, grpc.ssl_channel_credentials(f.read()), options)
            else:
                self._encoder_channel = grpc.aio.insecure_channel(self.config.encoder, options)
        return self._encoder_channel

    async def dependencies_ready(self) -> bool:
        """Whether the encoder answers its health check with SERVING (behind Ray's proxy, which has no
        grpc.health, any answer counts)."""
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel()).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.UNIMPLEMENTED

    async def _encode(self, request: luvc_pb2.GenerateRequest, method: str, call: Call) -> tuple[luvc_pb2.EncodeResponse, float]:
        metadata = [(REQUEST_ID, call.request_id)]
        if self.config.encoder_token:
            metadata.append(("authorization", f"Bearer {self.config.encoder_token}"))
        if self.config.encoder_application:
            metadata.append(("application", self.config.encoder_application))
        encode_request = luvc_pb2.EncodeRequest(
            media=request.media, method=method, wire_dtype=wire_dtype(request.wire_dtype or self.config.default_wire_dtype)
        )
        t0 = time.perf_counter()
        try:
            response = await luvc_pb2_grpc.EncoderStub(self._channel()).Encode(encode_request, timeout=call.time_left(), metadata=metadata)
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), shorten(e.details() or "", 500)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ServiceError(code, f"encoder at {self.config.encoder}: {details}") from None
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):  # our credentials, not the client's
                log(self.logger, "the encoder refused this service's token: check --encoder-token", logging.ERROR, request_id=call.request_id)
                raise ServiceError(grpc.StatusCode.INTERNAL, "the LLM service is misconfigured: its encoder refused its credentials") from None
            raise ServiceError(code, f"encoder rejected the media: {details}") from None
        return response, (time.perf_counter() - t0) * 1e3

    async def _visual(self, request: luvc_pb2.GenerateRequest, spec: str, call: Call) -> tuple[luvc_pb2.EncodeResponse | None, float]:
        """The request's visual tokens (precomputed, from the encoder, or none) and the encoder round trip in ms."""
        if request.HasField("visual") and request.media:
            raise PromptError("give either media or visual tokens, not both")
        if request.HasField("visual"):
            return request.visual, 0.0
        if request.media:
            return await self._encode(request, spec, call)
        return None, 0.0

    async def generate(self, request: luvc_pb2.GenerateRequest, call: Call):
        """Yield GenerateResponse chunks of new text; the last one carries GenerateStats.

        Cheap checks (sizes, method, limits) run first on the event loop; parsing tokens and
        tokenizing run on threads; then the request joins the batching engine's queue, whose worker
        drops its row once the call is cancelled or past its deadline."""
        self.gate.admit(call)
        t_start = time.perf_counter()
        spec = request.method or self.config.default_method
        method = method_config(spec)
        max_new = request.max_new_tokens or self.config.default_max_new_tokens
        gen, engine = self.generator, self.generator.engine
        gen.check(request.prompt, max_new)  # before the encoder is called
        visual, round_trip_ms = await self._visual(request, spec, call)
        hidden = engine.config.text_config.hidden_size
        encoded = EncodedMedia.empty(hidden) if visual is None else \
            await asyncio.to_thread(encoded_from_proto, visual, hidden, engine.unit, self.config.limits)
        ids = await asyncio.to_thread(gen.prompt_ids, request.prompt, encoded)  # validate before queueing

        tokens, text, detokenizer = [], "", DecodeStream(skip_special_tokens=True)  # incremental: each token decoded once
        first = last = None
        async for out in self._submit(ids, encoded, method, max_new, request.ignore_eos, call):
            t_last = time.perf_counter()
            if first is None:
                first, t_first = out, t_last
            if out.token_ids:
                if not tokens:
                    self.metrics.ttft.labels(method.method).observe(t_last - t_start)
                tokens += out.token_ids
                new = "".join(filter(None, (detokenizer.step(gen.tokenizer.backend_tokenizer, t) for t in out.token_ids)))
                yield luvc_pb2.GenerateResponse(text=new, token_ids=out.token_ids)
                text += new
            last = out
        if last.finished == "error":
            raise last.error
        if last.finished == "stopped":
            raise call.stop_error()
        result = gen.result(ids, encoded, method, tokens, first.visual_per_layer, first.prefill_ms, (t_last - t_first) * 1e3)
        timings = {"encode": encoded.encode_ms, "transfer": max(0.0, round_trip_ms - encoded.encode_ms),
                   "prefill": first.prefill_ms, "decode": result.timings_ms["decode"], "total": (time.perf_counter() - t_start) * 1e3}
        stats = self._stats(result, spec, visual, timings, call)
        self._record(result, method.method, stats)  # labelled by name: specs are client text, unbounded
        log(self.logger, "generated", request_id=call.request_id, method=spec, prompt_tokens=len(result.prompt_ids),
            new_tokens=len(result.token_ids), llm_per_layer=result.visual_tokens["llm_per_layer"], payload_bytes=stats.payload_bytes,
            batch_size=first.batch_size, **{f"{k}_ms": round(t, 2) for k, t in timings.items()})
        yield luvc_pb2.GenerateResponse(text=result.text[len(text):], stats=stats)

    async def _submit(self, ids: list[int], encoded: EncodedMedia, method, max_new: int, ignore_eos: bool, call: Call) -> AsyncIterator[Output]:
        """Queue the request in the batching engine (RESOURCE_EXHAUSTED beyond max_queue waiting) and
        yield its outputs up to the finished one. A consumer that goes away stops the request, so the
        engine drops its row at its next step."""
        waiting, _ = self.batcher.load
        if waiting >= self.server.max_queue:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {waiting} requests queued (max_queue={self.server.max_queue})")
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()
        emit = lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out)  # noqa: E731 - called on the engine's thread
        self.batcher.add(EngineRequest(ids, encoded, method, max_new, emit, call.stopped, ignore_eos))
        try:
            while True:
                out = await outputs.get()
                if out.batch_size:
                    self.metrics.batch_size.labels("llm").observe(out.batch_size)
                yield out
                if out.finished:
                    return
        finally:
            call.stop.set()  # a no-op once finished; otherwise the engine drops the row

    def _record(self, result: GenerateResult, name: str, stats: luvc_pb2.GenerateStats) -> None:
        m = self.metrics
        m.prompt_tokens.labels(name).inc(len(result.prompt_ids))
        m.generated_tokens.labels(name).inc(len(result.token_ids))
        for layer, n in enumerate(result.visual_tokens["llm_per_layer"]):
            m.visual_tokens.labels(name, str(layer)).inc(n)
        m.payload_bytes.labels("llm").inc(stats.payload_bytes)

    def _stats(self, result: GenerateResult, spec: str, visual: luvc_pb2.EncodeResponse | None, timings: dict,
               call: Call) -> luvc_pb2.GenerateStats:
        v, unit = result.visual_tokens, self.generator.engine.unit
        return luvc_pb2.GenerateStats(
            request_id=call.request_id, model=result.model, method=spec, prompt_ids=result.prompt_ids,
            token_ids=result.token_ids, text=result.text, vit_patches=v["vit_patches"], encoder_out=v["encoder_out"],
            llm_per_layer=v["llm_per_layer"], payload_bytes=len(visual.tokens.data) if visual is not None else 0,
            payload_bytes_uncompressed=uncompressed_payload_bytes(visual, unit) if visual is not None else 0,
            timings_ms=timings,
        )


class LLMServicer(ServicerBase, luvc_pb2_grpc.LLMServicer):
    """The gRPC face of LLMService, for grpc.aio and Ray Serve alike."""

    service_class = LLMService
    add_to_server = staticmethod(luvc_pb2_grpc.add_LLMServicer_to_server)
    service_name = SERVICE_NAME

    async def Generate(self, request, grpc_context):
        async for chunk in self._streaming(grpc_context, self.service.generate, request):
            yield chunk

