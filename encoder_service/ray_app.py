"""The encoder stage as its own autoscaled Ray Serve application (builder for serve.yaml)."""
from __future__ import annotations

from encoder_service.config import EncoderConfig
from encoder_service.service import EncoderServicer
from luvc_common.serving.ray import configs_from_args, deployment


def encoder_app(args: dict):
    """Builder: args named like `luvc serve encoder`'s flags (model, dtype, device, attn_implementation,
    default_method, wire_dtype, any Limits field), auth_token, max_queue, grace_s and the deployment
    overrides."""
    config, server = configs_from_args(args, EncoderConfig)
    return deployment(EncoderServicer, "encoder", args, server, config.max_batch).bind(config, server, on_ray=True)
