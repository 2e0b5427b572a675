"""What both gRPC services share: config, errors with status codes, auth, health, reflection,
request ids, JSON logs, and a run loop that drains in-flight requests on SIGTERM.

The services themselves are plain classes (EncoderService, LLMService) whose async methods take a
request message plus a `Call` and raise ServiceError; the grpc.aio servicers here are thin shells
around them, so another transport (Ray Serve) can host the same classes.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from luvc_common.config import REQUEST_ID, MiB
from luvc_common.errors import ConfigError, UserError, shorten


@dataclass(frozen=True)
class ServerConfig:
    """Network-facing settings of one service process."""

    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = field(default=50051, metadata={"cli_required": True})
    """Port to bind; 0 picks a free one."""
    max_message_mb: int = 64
    """Largest gRPC message accepted or sent, both directions, in MiB."""
    max_queue: int = 32
    """Requests waiting for the engine (not yet in a batch); more get RESOURCE_EXHAUSTED."""
    grace_s: float = 30.0
    """On SIGTERM, how long in-flight requests may finish before the server exits."""
    auth_token: str | None = field(default=None, metadata={"env": "LUVC_AUTH_TOKEN"})
    """When set, every RPC except health must carry `authorization: Bearer <token>`."""
    tls_cert: str | None = None
    """PEM certificate chain file; with tls_key, serve TLS instead of plaintext."""
    tls_key: str | None = None
    """PEM private key file."""
    health_interval_s: float = 2.0
    """How often a service with dependencies (the LLM's encoder) checks them for its health status."""
    metrics_port: int | None = field(default=None, metadata={"env": "LUVC_METRICS_PORT"})
    """Port of the Prometheus /metrics endpoint (plain HTTP, on host); 0 picks a free one; unset: none."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port={self.port} is invalid: expected 0..65535")
        if self.max_message_mb < 1:
            raise ConfigError(f"max_message_mb={self.max_message_mb} is invalid: expected at least 1")
        if self.max_queue < 0 or self.grace_s < 0 or self.health_interval_s <= 0:
            raise ConfigError("max_queue and grace_s must be >= 0 and health_interval_s > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be given together")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics_port={self.metrics_port} is invalid: expected 0..65535")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MiB

    def channel_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_send_message_length", self.max_message_bytes), ("grpc.max_receive_message_length", self.max_message_bytes)]


class ServiceError(Exception):
    """An RPC failure with the gRPC status code the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)  # both in args, so it pickles across Ray processes
        self.code, self.message = code, message

    def __str__(self) -> str:
        return self.message


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass
class Call:
    """Transport-independent view of one RPC: request id, auth header, deadline, and a stop flag the
    engines poll between steps (set when the client cancels or goes away)."""

    request_id: str
    authorization: str = ""
    deadline: float | None = None
    """time.monotonic() by which the client stops waiting, if it set a deadline."""
    stop: threading.Event = field(default_factory=threading.Event)

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def stopped(self) -> bool:
        return self.stop.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def stop_error(self) -> "ServiceError":
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the work finished")
        return ServiceError(grpc.StatusCode.CANCELLED, "request cancelled")

    @classmethod
    def from_context(cls, context) -> "Call":
        """From a grpc.aio ServicerContext or Ray Serve's RayServegRPCContext (which has no deadline;
        Ray's proxy enforces its own request_timeout_s). A request id that is not 1-64 characters of
        [A-Za-z0-9._:-] is replaced by a fresh one."""
        meta = {k: v for k, v in (context.invocation_metadata() or ())}
        remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
        request_id = meta.get(REQUEST_ID, "")
        return cls(
            request_id=request_id if isinstance(request_id, str) and _REQUEST_ID.fullmatch(request_id) else uuid.uuid4().hex[:16],
            authorization=meta.get("authorization", ""),
            deadline=None if remaining is None else time.monotonic() + remaining,
        )


class Gate:
    """Readiness and auth of one service: a request is admitted once the model has loaded and its
    bearer token (when one is configured) matches. Backpressure and compute live in the engines."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.ready = False

    def admit(self, call: Call) -> None:
        token = self.config.auth_token
        if token and not hmac.compare_digest(call.authorization.encode(), f"Bearer {token}".encode()):
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if not self.ready:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "model is still loading; retry when health is SERVING")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "service": record.name, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)  # a field of an odd type must never lose the line


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


MAX_DETAILS = 1000
"""Longest status message sent to a client (gRPC's trailers must fit its 8 KiB header limit)."""


def status_of(error: BaseException, call: Call) -> tuple[grpc.StatusCode, str]:
    """The status code and bounded message a failure gets; unexpected errors are INTERNAL."""
    if isinstance(error, ServiceError):
        code, message = error.code, str(error)
    elif isinstance(error, UserError):
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see server log, request {call.request_id}"
    return code, shorten(message, MAX_DETAILS)


async def abort_on_error(context, error: BaseException, logger: logging.Logger, call: Call) -> None:
    """Turn an exception into the RPC's status (always raises); unexpected ones are logged with
    their traceback. A grpc.aio context aborts; Ray Serve's context takes the code and details, and
    the re-raised error makes Ray's proxy answer with them."""
    code, message = status_of(error, call)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("unexpected error", exc_info=error, extra={"fields": {"request_id": call.request_id}})
    log(logger, "request failed", logging.WARNING, request_id=call.request_id, code=code.name, error=message)
    if hasattr(context, "abort"):
        await context.abort(code, message)
    context.set_code(code)
    context.set_details(message)
    raise error


def log_abandoned(logger: logging.Logger, call: Call) -> None:
    """The line a request leaves when its client went away (cancel or deadline) mid-work."""
    log(logger, "request abandoned", logging.WARNING, request_id=call.request_id, code=call.stop_error().code.name)


_CORRUPT = object()


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """What every RPC passes before its handler runs, health checks excepted: the bearer token is
    checked from the headers, before the request body is read, and a body that does not parse as
    the method's message gets INVALID_ARGUMENT instead of gRPC's UNKNOWN."""

    OPEN = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str | None):
        self.expected = f"Bearer {token}".encode() if token else None

    async def intercept_service(self, continuation, details):
        method = details.method
        if not method.startswith(self.OPEN) and self.expected is not None:
            given = dict(details.invocation_metadata or ()).get("authorization", "")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.expected):
                return _refuse(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        handler = await continuation(details)
        if handler is None:
            return _refuse(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {shorten(method, 120)}")
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        return _parse_safely(handler, method)


def _refuse(code: grpc.StatusCode, message: str):
    """A handler that answers `code` without reading the request (a streaming-request handler never
    pulls the body off the wire)."""
    async def refuse(_requests, context):
        await context.abort(code, message)
    return grpc.stream_stream_rpc_method_handler(refuse)


def _parse_safely(handler, method: str):
    deserialize = handler.request_deserializer

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - any parse failure is the client's bad body
            return _CORRUPT

    message = f"request body is not a valid message for {shorten(method, 120)}"
    if handler.unary_unary:
        async def unary(request, context):
            if request is _CORRUPT:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            return await handler.unary_unary(request, context)
        return handler._replace(request_deserializer=parse, unary_unary=unary)

    async def streaming(request, context):
        if request is _CORRUPT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        async for reply in handler.unary_stream(request, context):
            yield reply
    return handler._replace(request_deserializer=parse, unary_stream=streaming)


class ServicerBase:
    """What a gRPC servicer shares: it owns one service (`service_class(config, server, on_ray)`); the
    same servicer object is hosted by grpc.aio (`run`) or as a Ray Serve replica (`on_ray`: loaded at
    once, metrics recorded to Ray's metrics agent).
    Ray passes its context as the keyword `grpc_context`; grpc.aio passes it positionally.
    Every failure becomes a status code; a client that goes away leaves a log line."""

    service_class: type
    add_to_server: Callable
    service_name: str

    def __init__(self, config, server: ServerConfig, on_ray: bool = False):
        self.service = self.service_class(config, server, on_ray)
        if on_ray:
            self.service.load()
            self.service.gate.ready = True

    async def _unary(self, grpc_context, method: Callable, request):
        async def one(request, call):
            yield await method(request, call)
        (reply,) = [r async for r in self._streaming(grpc_context, one, request, method.__name__)]
        return reply

    async def _streaming(self, grpc_context, method: Callable, request, name: str | None = None):
        call, t0 = Call.from_context(grpc_context), time.perf_counter()

        def done(code: str) -> None:
            self.service.metrics.request_done(name or method.__name__, code, time.perf_counter() - t0)
        try:
            async for reply in method(request, call):
                yield reply
        except (asyncio.CancelledError, GeneratorExit):
            done(call.stop_error().code.name)
            log_abandoned(self.service.logger, call)
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status code
            # counted before the abort sends the status: a client that reads /metrics next must see it
            done(status_of(e, call)[0].name)
            await abort_on_error(grpc_context, e, self.service.logger, call)
        else:
            done("OK")

    @classmethod
    def run(cls, config, server: ServerConfig) -> None:
        """Serve with grpc.aio until SIGTERM (see `serve`)."""
        servicer = cls(config, server)
        asyncio.run(serve(server, [cls.service_name], lambda s: cls.add_to_server(servicer, s), servicer.service))


async def _set_health(health: HealthServicer, names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await health.set(name, status)


async def _watch_dependencies(service, health: HealthServicer, names: list[str], interval_s: float) -> None:
    """Health follows service.dependencies_ready() (the LLM's encoder), checked every interval_s."""
    ready = True
    while True:
        now = await service.dependencies_ready()
        if now != ready:
            ready = now
            await _set_health(health, names, ready)
            log(service.logger, "dependencies ready; SERVING" if ready else "a dependency is unreachable; NOT_SERVING",
                logging.INFO if ready else logging.WARNING)
        await asyncio.sleep(interval_s)


async def serve(config: ServerConfig, service_names: list[str], add_servicers: Callable[[grpc.aio.Server], None], service) -> None:
    """Start the server (health NOT_SERVING), load the model in a thread, flip to SERVING, and run
    until SIGTERM/SIGINT; then report NOT_SERVING, stop taking new RPCs and drain for grace_s.
    A service with `dependencies_ready()` reports NOT_SERVING while that answers False."""
    server = grpc.aio.server(options=config.channel_options(), interceptors=[GuardInterceptor(config.auth_token)])
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
    await _set_health(health, service_names, False)
    await server.start()
    logger = service.logger
    log(logger, "listening", host=config.host, port=port, tls=bool(config.tls_cert), auth=bool(config.auth_token))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    delay = float(os.environ.get("LUVC_DEBUG_LOAD_DELAY_S", "0"))  # lets tests observe the loading state
    loader = asyncio.ensure_future(asyncio.to_thread(lambda: (time.sleep(delay), service.load())))
    await asyncio.wait([loader, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    watcher = None
    if loader.done():
        loader.result()  # a failed load ends the process with its error
        service.gate.ready = True
        await _set_health(health, service_names, True)
        log(logger, "model loaded; SERVING")
        if config.metrics_port is not None:
            log(logger, "metrics on /metrics", host=config.host, port=service.metrics.serve(config.host, config.metrics_port))
        if hasattr(service, "dependencies_ready"):
            watcher = asyncio.ensure_future(_watch_dependencies(service, health, service_names, config.health_interval_s))
        await stop.wait()
    if watcher:
        watcher.cancel()
    log(logger, "stopping: draining in-flight requests", grace_s=config.grace_s)
    await _set_health(health, service_names, False)
    await server.stop(config.grace_s)
    log(logger, "stopped")
