"""The LLM service's configuration (torch-free: the command line builds its flags from it)."""
from __future__ import annotations

from dataclasses import dataclass, field

from luvc_common.config import WIRE_DTYPES, Limits, ModelConfig, check_field


@dataclass(frozen=True)
class LLMConfig:
    """What the LLM service serves, where its encoder is, and its defaults."""

    encoder: str = field(default="127.0.0.1:50052", metadata={"cli_required": True})
    """host:port of the encoder service, called when a request carries media."""
    model: ModelConfig = ModelConfig()
    """Checkpoint (only its language model is loaded)."""
    limits: Limits = field(default=Limits(), metadata={"env_prefix": "LUVC_"})
    """Per-request limits."""
    default_method: str = "luvc"
    """Compression method when a request names none."""
    default_wire_dtype: str = field(default="BF16", metadata={"flag": "wire_dtype"})
    """Encoder -> LLM token dtype when a request names none."""
    default_max_new_tokens: int = 64
    """Tokens generated when a request names no max_new_tokens."""
    max_batch: int = 16
    """Requests prefilled and decoded together at most (those waiting when the engine is free)."""
    max_batch_tokens: int = 32768
    """Prompt tokens of one batch at most (a longer single request still runs alone)."""
    encoder_tls_ca: str | None = None
    """PEM CA bundle to verify a TLS encoder; None = plaintext channel."""
    encoder_token: str | None = field(default=None, metadata={"env": "LUVC_ENCODER_TOKEN"})
    """Bearer token sent to the encoder."""
    encoder_application: str | None = None
    """Ray Serve application name of the encoder, when it runs behind Ray's gRPC proxy."""

    def __post_init__(self) -> None:
        check_field(self.max_batch >= 1 and self.max_batch_tokens >= 1, "max_batch", (self.max_batch, self.max_batch_tokens),
                    "max_batch and max_batch_tokens of at least 1")
        check_field(self.default_wire_dtype in WIRE_DTYPES, "wire_dtype", self.default_wire_dtype, f"one of {list(WIRE_DTYPES)}")
