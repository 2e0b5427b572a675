"""The encoder service's configuration (torch-free: the command line builds its flags from it)."""
from __future__ import annotations

from dataclasses import dataclass, field

from luvc_common.config import WIRE_DTYPES, Limits, ModelConfig, check_field


@dataclass(frozen=True)
class EncoderConfig:
    """What the encoder serves and with which defaults."""

    model: ModelConfig = ModelConfig()
    """Checkpoint (only its vision tower and projector are loaded)."""
    limits: Limits = field(default=Limits(), metadata={"env_prefix": "LUVC_"})
    """Per-request media limits."""
    default_method: str = "luvc"
    """Compression method when a request names none."""
    default_wire_dtype: str = field(default="BF16", metadata={"flag": "wire_dtype"})
    """Wire dtype of the returned tokens when a request names none."""
    max_batch: int = 8
    """Requests encoded in one packed forward at most (those waiting when the tower is free, same
    method, max_vit_patches patches in all)."""

    def __post_init__(self) -> None:
        check_field(self.max_batch >= 1, "max_batch", self.max_batch, "at least 1")
        check_field(self.default_wire_dtype in WIRE_DTYPES, "wire_dtype", self.default_wire_dtype, f"one of {list(WIRE_DTYPES)}")
