"""What a service needs to run as a Ray Serve application behind Ray's native gRPC proxy (the `ray`
extra): deployment options, configs from a builder's args, and a run loop for `luvc serve ... --ray`.

The deployments are the very servicer classes the plain gRPC servers use; each service package
has its builder (`encoder_service.ray_app:encoder_app`, `llm_service.ray_app:llm_app`), taking the
same `args` from Python, from `serve run module:builder key=value`, or from deploy/ray/serve.yaml.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import ray
from ray import serve

from luvc_common.config import build, leaves
from luvc_common.errors import ConfigError
from luvc_common.serving.launch import free_port
from luvc_common.serving.runtime import ServerConfig, get_logger, log

SERVICER_FUNCTIONS = [
    "luvc_common.proto.luvc_pb2_grpc.add_LLMServicer_to_server",
    "luvc_common.proto.luvc_pb2_grpc.add_EncoderServicer_to_server",
]
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 10.0,
    "downscale_delay_s": 60.0,
}
"""Defaults; override per deployment in serve.yaml or with builder args."""
DEPLOYMENT_ARGS = {"num_gpus", "num_cpus", "max_ongoing_requests", *AUTOSCALING}
SERVER_ARGS = ("auth_token", "max_queue", "grace_s")
"""ServerConfig fields a replica uses (Ray's proxy owns the port, message size and TLS)."""
"""Builder args that shape the deployment rather than the service."""


def actor_options(args: dict) -> dict:
    """One GPU per replica where the cluster has GPUs, else a fraction of a CPU (a 2-core box can
    then hold several replicas)."""
    if "num_gpus" in args or "num_cpus" in args:
        return {k: float(args[k]) for k in ("num_gpus", "num_cpus") if k in args}
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) > 0 else {"num_cpus": 0.25}


def deployment(servicer, name: str, args: dict, server: ServerConfig, max_batch: int):
    """`servicer` as an autoscaled deployment: each replica's own queue is server.max_queue (Ray lets in
    that plus a full batch plus one, so the replica answers RESOURCE_EXHAUSTED itself), and
    server.grace_s is Ray's graceful shutdown timeout."""
    autoscaling = {**AUTOSCALING, **{k: type(v)(args[k]) for k, v in AUTOSCALING.items() if k in args}}
    return serve.deployment(
        servicer,
        name=name,
        autoscaling_config=autoscaling,
        ray_actor_options=actor_options(args),
        max_ongoing_requests=int(args.get("max_ongoing_requests", server.max_queue + max_batch + 1)),
        graceful_shutdown_timeout_s=server.grace_s,
    )


def configs_from_args(args: dict, service_config: type):
    """(service config, ServerConfig) from a builder's args: the leaves of the service's config tree (the
    same names as its `luvc serve` flags, with underscores), ServerConfig's auth_token, max_queue and
    grace_s, and the deployment args. A leaf with an environment variable (LUVC_AUTH_TOKEN,
    LUVC_ENCODER_TOKEN, LUVC_MAX_*) takes it from the node's environment unless an arg sets it, as the
    flags do. Unknown keys are an error, so a misspelt limit is never silently dropped."""
    service = leaves(service_config)
    known = {leaf.name for leaf in service} | set(SERVER_ARGS) | DEPLOYMENT_ARGS
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown {service_config.__name__} args {unknown}; expected some of {sorted(known)}")
    with_env = service + [leaf for leaf in leaves(ServerConfig) if leaf.name in SERVER_ARGS]
    args = {**{leaf.name: os.environ[leaf.env] for leaf in with_env if leaf.env and leaf.env in os.environ}, **args}
    return build(service_config, args), build(ServerConfig, {k: args[k] for k in SERVER_ARGS if k in args})


def run_on_ray(build_app: Callable, name: str, server: ServerConfig) -> None:
    """`luvc serve ... --ray`: join RAY_ADDRESS or start a local Ray (temp dir RAY_TMPDIR), run the app
    build_app() returns (after ray.init: it asks the cluster for GPUs) behind Ray's gRPC proxy on
    server.host:server.port, and shut down what we started on SIGTERM.

    Ray's proxy serves plaintext only, so TLS is refused here (terminate it in front of the proxy).
    Replicas record their metrics to Ray's metrics agent, which a local Ray instance exports at
    --metrics-port (with Ray's and Ray Serve's own); on an existing cluster each node's
    `ray start --metrics-export-port` decides, so --metrics-port is refused there. The message limit
    reaches the proxy through RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, which a local Ray instance inherits (on an
    existing cluster, set it on the nodes)."""
    if server.tls_cert:
        raise ConfigError("--tls-cert/--tls-key with --ray: Ray Serve's gRPC proxy serves plaintext only; "
                          "terminate TLS in front of it, or serve without --ray")
    address = os.environ.pop("RAY_ADDRESS", "") or None  # Ray itself rejects an empty RAY_ADDRESS
    if server.metrics_port is not None and address:
        raise ConfigError("--metrics-port with --ray on an existing cluster: replicas' metrics are exported by each "
                          "node's metrics agent, at the port its `ray start --metrics-export-port` set")
    metrics_port = None if server.metrics_port is None else server.metrics_port or free_port(server.host)
    logger = get_logger(f"{name}-ray")
    t0 = time.perf_counter()
    os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(server.max_message_bytes)
    ray.init(address=address, include_dashboard=False, _temp_dir=os.environ.get("RAY_TMPDIR") or None,
             **({"_metrics_export_port": metrics_port} if metrics_port else {}))
    t_ray = time.perf_counter()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stop.set())
    serve.start(
        http_options={"host": server.host, "port": int(os.environ.get("LUVC_RAY_HTTP_PORT", 0)) or free_port(server.host)},
        grpc_options={"port": server.port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
    )
    serve.run(build_app(), name=name, route_prefix=f"/{name}")
    log(logger, "deployed; SERVING through Ray's gRPC proxy", port=server.port, application=name, auth=bool(server.auth_token),
        ray_start_s=round(t_ray - t0, 2), deploy_s=round(time.perf_counter() - t_ray, 2), joined_cluster=address is not None,
        metrics_port=metrics_port)
    stop.wait()
    log(logger, "stopping")
    serve.shutdown()
    ray.shutdown()
    log(logger, "stopped")
