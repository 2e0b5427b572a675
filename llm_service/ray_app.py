"""The LLM stage as a Ray Serve application (builder for serve.yaml, and `luvc serve llm --ray`)."""
from __future__ import annotations

from llm_service.config import LLMConfig
from llm_service.service import LLMServicer
from luvc_common.errors import ConfigError
from luvc_common.serving.ray import configs_from_args, deployment, run_on_ray
from luvc_common.serving.runtime import ServerConfig


def llm_app(args: dict, config: LLMConfig | None = None, server: ServerConfig | None = None):
    """Builder: args named like `luvc serve llm`'s flags (encoder (host:port, required), model, dtype,
    device, attn_implementation, encoder_application, encoder_token, encoder_tls_ca, default_method,
    default_max_new_tokens, wire_dtype, any Limits field), auth_token, max_queue, grace_s, and autoscaling /
    actor overrides (min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s,
    downscale_delay_s, num_gpus, num_cpus, max_ongoing_requests). `luvc serve llm --ray` passes its
    own config objects instead of the config args."""
    if config is None:
        if "encoder" not in args:
            raise ConfigError("llm_app needs an `encoder` arg (host:port of the encoder)")
        config, server = configs_from_args(args, LLMConfig)
    return deployment(LLMServicer, "llm", args, server, config.max_batch).bind(config, server, on_ray=True)


def run_llm_on_ray(config: LLMConfig, server: ServerConfig) -> None:
    """`luvc serve llm --ray`: the plain server's config objects, deployed as the `llm` application."""
    run_on_ray(lambda: llm_app({}, config, server), "llm", server)
