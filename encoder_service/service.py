"""The encoder service: media in, OIM-compressed visual tokens out."""
from __future__ import annotations

import asyncio

from PIL import Image

from encoder_service.config import EncoderConfig

from luvc_common.compression.methods import method_config
from luvc_common.engine.media import Media
from luvc_common.serving.messages import encoded_to_proto, media_files_from_proto
from luvc_common.engine.pipeline import VisionEncoder
from luvc_common.proto import luvc_pb2, luvc_pb2_grpc
from luvc_common.serving.metrics import Metrics
from luvc_common.serving.runtime import Call, Gate, ServerConfig, ServicerBase, get_logger, log
from luvc_common.serving.wire import wire_dtype

SERVICE_NAME = luvc_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name


class EncoderService:
    """Transport-independent encoder: call `load()` once, then `encode()` per request."""

    def __init__(self, config: EncoderConfig, server: ServerConfig):
        self.config = config
        self.metrics = Metrics("encoder")
        self.gate = Gate(server, self.metrics)
        self.logger = get_logger("encoder")
        self.encoder: VisionEncoder | None = None

    def load(self) -> None:
        self.encoder = VisionEncoder(self.config.model)
        blank = Media("image", [Image.new("RGB", (224, 224), "white")])
        self.encoder.encode([blank], method_config(self.config.default_method))  # warm up before SERVING

    async def encode(self, request: luvc_pb2.EncodeRequest, call: Call) -> luvc_pb2.EncodeResponse:
        """Every check that reads only headers runs before the queue; decoding and the tower run in the
        compute slot, one request at a time, and stop between frames and blocks when the call ends."""
        self.gate.admit(call)
        method = method_config(request.method or self.config.default_method)
        dtype = wire_dtype(request.wire_dtype or self.config.default_wire_dtype)
        limits = self.config.limits
        files = await asyncio.to_thread(media_files_from_proto, request.media, limits)
        self.encoder.check_patches(files, limits)
        encoded = await self.gate.run(call, lambda: self.encoder.encode(self.encoder.decode(files, limits, call.check), method, call.check))
        response = encoded_to_proto(encoded, self.encoder.unit, dtype, self.config.model.path)
        self.metrics.encoder_tokens.labels(method.method).inc(len(encoded.embeds))
        self.metrics.payload_bytes.labels("encoder").inc(len(response.tokens.data))
        log(self.logger, "encoded", request_id=call.request_id, method=method.method, media=len(files),
            vit_patches=encoded.vit_patches, tokens=len(encoded.embeds), payload_bytes=len(response.tokens.data),
            encode_ms=round(encoded.encode_ms, 2))
        return response


class EncoderServicer(ServicerBase, luvc_pb2_grpc.EncoderServicer):
    """The gRPC face of EncoderService, for grpc.aio and Ray Serve alike."""

    service_class = EncoderService
    add_to_server = staticmethod(luvc_pb2_grpc.add_EncoderServicer_to_server)
    service_name = SERVICE_NAME

    async def Encode(self, request, grpc_context):
        return await self._unary(grpc_context, self.service.encode, request)

