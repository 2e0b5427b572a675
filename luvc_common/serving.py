"""What both gRPC services share: config, errors with status codes, auth, health, reflection,
request ids, JSON logs, and a run loop that drains in-flight requests on SIGTERM.

The services themselves are plain classes (EncoderService, LLMService) whose async methods take a
request message plus a `Call` and raise ServiceError; the grpc.aio servicers here are thin shells
around them, so another transport (Ray Serve) can host the same classes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from luvc_common.client import MiB, REQUEST_ID
from luvc_common.errors import ConfigError, UserError


@dataclass(frozen=True)
class ServerConfig:
    """Network-facing settings of one service process."""

    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 50051
    """Port to bind; 0 picks a free one."""
    max_message_bytes: int = 64 * MiB
    """Largest gRPC message accepted or sent, both directions."""
    max_queue: int = 32
    """Requests waiting for the model beyond the one running; more get RESOURCE_EXHAUSTED."""
    grace_s: float = 30.0
    """On SIGTERM, how long in-flight requests may finish before the server exits."""
    auth_token: str | None = None
    """When set, every RPC except health must carry `authorization: Bearer <token>`."""
    tls_cert: str | None = None
    """PEM certificate chain file; with tls_key, serve TLS instead of plaintext."""
    tls_key: str | None = None
    """PEM private key file."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port={self.port} is invalid: expected 0..65535")
        if self.max_message_bytes < MiB:
            raise ConfigError(f"max_message_bytes={self.max_message_bytes} is invalid: expected at least {MiB}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be given together")

    def channel_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_send_message_length", self.max_message_bytes), ("grpc.max_receive_message_length", self.max_message_bytes)]


class ServiceError(Exception):
    """An RPC failure with the gRPC status code the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)  # both in args, so it pickles across Ray processes
        self.code, self.message = code, message

    def __str__(self) -> str:
        return self.message


@dataclass
class Call:
    """Transport-independent view of one RPC: request id, auth header, deadline, cancellation."""

    request_id: str
    authorization: str = ""
    deadline: float | None = None
    """time.monotonic() by which the client stops waiting, if it set a deadline."""
    cancelled: Callable[[], bool] = lambda: False

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    @classmethod
    def from_context(cls, context) -> "Call":
        """From a grpc.aio ServicerContext or Ray Serve's RayServegRPCContext (which has neither a
        deadline nor cancellation; Ray's proxy enforces its own request_timeout_s)."""
        meta = {k: v for k, v in (context.invocation_metadata() or ())}
        remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
        return cls(
            request_id=meta.get(REQUEST_ID) or uuid.uuid4().hex[:16],
            authorization=meta.get("authorization", ""),
            deadline=None if remaining is None else time.monotonic() + remaining,
            cancelled=getattr(context, "cancelled", lambda: False),
        )


class Gate:
    """Readiness, auth and backpressure for one model: one request computes, max_queue wait."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.ready = False
        self._compute = asyncio.Semaphore(1)
        self._waiting = 0

    def admit(self, call: Call) -> None:
        token = self.config.auth_token
        if token and call.authorization != f"Bearer {token}":
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if not self.ready:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "model is still loading; retry when health is SERVING")

    async def __aenter__(self):
        if self._waiting >= self.config.max_queue:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {self._waiting} requests queued (max_queue={self.config.max_queue})")
        self._waiting += 1
        try:
            await self._compute.acquire()
        finally:
            self._waiting -= 1

    async def __aexit__(self, *exc):
        self._compute.release()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "service": record.name, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry)


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("LUVC_LOG_LEVEL", "INFO"))
        logger.propagate = False
    return logger


def log(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields) -> None:
    logger.log(level, msg, extra={"fields": fields})


async def abort_on_error(context, error: Exception, logger: logging.Logger, call: Call) -> None:
    """Turn an exception into the RPC's status (always raises); unexpected ones become INTERNAL.

    A grpc.aio context aborts; Ray Serve's context takes the code and details, and the re-raised
    error makes Ray's proxy answer with them."""
    if isinstance(error, ServiceError):
        code, message = error.code, str(error)
    elif isinstance(error, UserError):
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
    else:
        logger.exception("unexpected error", extra={"fields": {"request_id": call.request_id}})
        code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see server log, request {call.request_id}"
    log(logger, "request failed", logging.WARNING, request_id=call.request_id, code=code.name, error=message)
    if hasattr(context, "abort"):
        await context.abort(code, message)
    context.set_code(code)
    context.set_details(message)
    raise error


class ServicerBase:
    """What a gRPC servicer shares: it owns one service (`service_class(config, server)`); the
    same servicer object is hosted by grpc.aio (`run`) or as a Ray Serve deployment (`load_now`).
    Ray passes its context as the keyword `grpc_context`; grpc.aio passes it positionally."""

    service_class: type
    add_to_server: Callable
    service_name: str

    def __init__(self, config, server: ServerConfig, load_now: bool = False):
        self.service = self.service_class(config, server)
        if load_now:
            self.service.load()
            self.service.gate.ready = True

    @classmethod
    def run(cls, config, server: ServerConfig) -> None:
        """Serve with grpc.aio until SIGTERM (see `serve`)."""
        servicer = cls(config, server)
        service = servicer.service
        add = lambda s: cls.add_to_server(servicer, s)  # noqa: E731
        asyncio.run(serve(server, [cls.service_name], add, service.load, service.gate, service.logger))


async def serve(
    config: ServerConfig,
    service_names: list[str],
    add_servicers: Callable[[grpc.aio.Server], None],
    load: Callable[[], None],
    gate: Gate,
    logger: logging.Logger,
) -> None:
    """Start the server (health NOT_SERVING), load the model in a thread, flip to SERVING, and run
    until SIGTERM/SIGINT; then report NOT_SERVING, stop taking new RPCs and drain for grace_s."""
    server = grpc.aio.server(options=config.channel_options())
    add_servicers(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(key.read(), cert.read())]))
    else:
        port = server.add_insecure_port(address)
    for name in ["", *service_names]:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log(logger, "listening", host=config.host, port=port, tls=bool(config.tls_cert), auth=bool(config.auth_token))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    delay = float(os.environ.get("LUVC_DEBUG_LOAD_DELAY_S", "0"))  # lets tests observe the loading state
    loader = asyncio.ensure_future(asyncio.to_thread(lambda: (time.sleep(delay), load())))
    await asyncio.wait([loader, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if loader.done():
        loader.result()  # a failed load ends the process with its error
        gate.ready = True
        for name in ["", *service_names]:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log(logger, "model loaded; SERVING")
        await stop.wait()
    log(logger, "stopping: draining in-flight requests", grace_s=config.grace_s)
    for name in ["", *service_names]:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(config.grace_s)
    log(logger, "stopped")
