"""The encoder service: media in, OIM-compressed visual tokens out."""
from __future__ import annotations

import asyncio

import grpc

from PIL import Image

from encoder_service.config import EncoderConfig

from luvc_common.compression.methods import method_config
from luvc_common.engine.media import Media
from luvc_common.serving.messages import encoded_to_proto, media_files_from_proto
from luvc_common.engine.batching import Cancelled, EncodeJob, EncoderBatcher
from luvc_common.engine.pipeline import EncodedMedia, VisionEncoder
from luvc_common.proto import luvc_pb2, luvc_pb2_grpc
from luvc_common.serving.metrics import Metrics
from luvc_common.serving.runtime import Call, Gate, ServerConfig, ServiceError, ServicerBase, get_logger, log
from luvc_common.serving.wire import wire_dtype

SERVICE_NAME = luvc_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name


class EncoderService:
    """Transport-independent encoder: call `load()` once, then `encode()` per request."""

    def __init__(self, config: EncoderConfig, server: ServerConfig, on_ray: bool = False):
        self.config = config
        self.server = server
        self.metrics = Metrics("encoder", on_ray)
        self.gate = Gate(server)
        self.logger = get_logger("encoder")
        self.encoder: VisionEncoder | None = None
        self.batcher: EncoderBatcher | None = None

    def load(self) -> None:
        self.encoder = VisionEncoder(self.config.model)
        blank = Media("image", [Image.new("RGB", (224, 224), "white")])
        self.encoder.encode([blank], method_config(self.config.default_method))  # warm up before SERVING
        self.batcher = EncoderBatcher(self.encoder, self.config.limits, self.config.max_batch)
        self.metrics.queue_depth.labels("encoder").set_function(lambda: self.batcher.load[0])  # read when scraped
        self.metrics.running.labels("encoder").set_function(lambda: self.batcher.load[1])

    async def encode(self, request: luvc_pb2.EncodeRequest, call: Call) -> luvc_pb2.EncodeResponse:
        """Every check that reads only headers runs before the queue; decoding and the tower run on the
        batcher's worker, packed with other waiting requests of the same method; a request that ends
        (cancel, deadline) is skipped or, when every request of its batch has ended, stops the tower."""
        self.gate.admit(call)
        method = method_config(request.method or self.config.default_method)
        dtype = wire_dtype(request.wire_dtype or self.config.default_wire_dtype)
        limits = self.config.limits
        files = await asyncio.to_thread(media_files_from_proto, request.media, limits)
        self.encoder.check_patches(files, limits)
        encoded = await self._encode(EncodeJob(files, method, call.stopped), call) if files else \
            EncodedMedia.empty(self.encoder.family.embed_dim(self.encoder.visual))
        response = encoded_to_proto(encoded, self.encoder.unit, dtype, self.config.model.path)
        self.metrics.encoder_tokens.labels(method.method).inc(len(encoded.embeds))
        self.metrics.payload_bytes.labels("encoder").inc(len(response.tokens.data))
        log(self.logger, "encoded", request_id=call.request_id, method=method.method, media=len(files),
            vit_patches=encoded.vit_patches, tokens=len(encoded.embeds), payload_bytes=len(response.tokens.data),
            encode_ms=round(encoded.encode_ms, 2))
        return response


    async def _encode(self, job: EncodeJob, call: Call) -> EncodedMedia:
        """The job's encoder output from the batcher (RESOURCE_EXHAUSTED beyond max_queue waiting)."""
        waiting, _ = self.batcher.load
        if waiting >= self.server.max_queue:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {waiting} requests queued (max_queue={self.server.max_queue})")
        try:
            return await asyncio.wrap_future(self.batcher.submit(job))
        except Cancelled:
            raise call.stop_error() from None
        finally:
            call.stop.set()  # a no-op once done; otherwise the batcher skips or stops the job


class EncoderServicer(ServicerBase, luvc_pb2_grpc.EncoderServicer):
    """The gRPC face of EncoderService, for grpc.aio and Ray Serve alike."""

    service_class = EncoderService
    add_to_server = staticmethod(luvc_pb2_grpc.add_EncoderServicer_to_server)
    service_name = SERVICE_NAME

    async def Encode(self, request, grpc_context):
        return await self._unary(grpc_context, self.service.encode, request)

