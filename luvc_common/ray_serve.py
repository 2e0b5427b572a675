"""The services as Ray Serve applications behind Ray's native gRPC proxy (needs the `ray` extra).

The deployments are the very servicer classes the plain gRPC servers use (LLMServicer,
EncoderServicer); Ray adds replicas, autoscaling and placement. Application builders take the
same `args` from Python, from `serve run module:builder key=value`, or from deploy/ray/serve.yaml.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import ray
from ray import serve

from encoder_service.service import EncoderConfig, EncoderServicer
from llm_service.service import LLMConfig, LLMServicer
from luvc_common.config import DEFAULT_MODEL
from luvc_common.launch import free_port
from luvc_common.models.loading import ModelConfig
from luvc_common.serving import ServerConfig, get_logger, log

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


def actor_options(args: dict) -> dict:
    """One GPU per replica where the cluster has GPUs, else a fraction of a CPU (a 2-core box can
    then hold several replicas)."""
    if "num_gpus" in args or "num_cpus" in args:
        return {k: float(args[k]) for k in ("num_gpus", "num_cpus") if k in args}
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) > 0 else {"num_cpus": 0.25}


def _autoscaling(args: dict) -> dict:
    return {**AUTOSCALING, **{k: type(v)(args[k]) for k, v in AUTOSCALING.items() if k in args}}


def _deployment(servicer, name: str, args: dict):
    return serve.deployment(
        servicer,
        name=name,
        autoscaling_config=_autoscaling(args),
        ray_actor_options=actor_options(args),
        max_ongoing_requests=int(args.get("max_ongoing_requests", 8)),
    )


def llm_app(args: dict):
    """Builder: args encoder (host:port, required), model, encoder_application, and autoscaling /
    actor overrides (min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s,
    downscale_delay_s, num_gpus, num_cpus, max_ongoing_requests)."""
    config = LLMConfig(
        encoder=args["encoder"],
        model=ModelConfig(args.get("model", str(DEFAULT_MODEL))),
        encoder_application=args.get("encoder_application"),
    )
    return _deployment(LLMServicer, "llm", args).bind(config, ServerConfig(), load_now=True)


def encoder_app(args: dict):
    """Builder for the encoder stage as its own autoscaled application: args model and overrides."""
    config = EncoderConfig(ModelConfig(args.get("model", str(DEFAULT_MODEL))))
    return _deployment(EncoderServicer, "encoder", args).bind(config, ServerConfig(), load_now=True)


def run_llm_on_ray(host: str, port: int, encoder: str, model: str, extra: dict | None = None) -> None:
    """`luvc serve llm --ray`: join RAY_ADDRESS or start a local Ray (temp dir RAY_TMPDIR), deploy
    the LLM app behind Ray's gRPC proxy on host:port, and shut down what we started on SIGTERM."""
    logger = get_logger("llm-ray")
    t0 = time.perf_counter()
    address = os.environ.pop("RAY_ADDRESS", "") or None  # Ray itself rejects an empty RAY_ADDRESS
    ray.init(address=address, include_dashboard=False, _temp_dir=os.environ.get("RAY_TMPDIR") or None)
    t_ray = time.perf_counter()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stop.set())
    serve.start(
        http_options={"host": host, "port": int(os.environ.get("LUVC_RAY_HTTP_PORT", 0)) or free_port(host)},
        grpc_options={"port": port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
    )
    serve.run(llm_app({"encoder": encoder, "model": model, **(extra or {})}), name="llm", route_prefix="/llm")
    log(logger, "deployed; SERVING through Ray's gRPC proxy", port=port, application="llm",
        ray_start_s=round(t_ray - t0, 2), deploy_s=round(time.perf_counter() - t_ray, 2), joined_cluster=address is not None)
    stop.wait()
    log(logger, "stopping")
    serve.shutdown()
    ray.shutdown()
    log(logger, "stopped")

