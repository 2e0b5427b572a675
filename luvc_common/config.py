"""Configuration shared by every layer: request limits, and the helpers that validate config dataclasses
and turn their field docstrings into CLI help."""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import MISSING, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any


from luvc_common.errors import ConfigError, MediaError, shorten

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "luvc-tiny-qwen2vl"
MiB = 1 << 20
REQUEST_ID = "x-request-id"
"""gRPC metadata key of the request id that crosses the encoder hop and tags every log line."""
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
"""Files read as video frames from a directory."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, by field name (what CLI help and errors show)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(d.value.value.split()) for a, d in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(d, ast.Expr) and isinstance(d.value, ast.Constant)}


def from_args(cls: type, args: dict[str, Any], **fixed: Any):
    """A config dataclass from loose key/value args (a Ray Serve builder's YAML args): each value is
    converted to its field's default type; unknown keys are ignored here and checked by the caller."""
    values = {}
    for f in fields(cls):
        if f.name in args and f.name not in fixed:
            kind = type(f.default) if f.default not in (None, MISSING) else str
            values[f.name] = kind(args[f.name])
    return cls(**values, **fixed)


def check_field(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={shorten(repr(value))} is invalid: expected {allowed}")


@dataclass(frozen=True)
class Limits:
    """Per-request input limits; exceeding one is a clear error, never a crash."""

    max_media: int = 8
    """Images plus videos in one request."""
    max_image_pixels: int = 4096 * 4096
    """Pixels (width x height) of one image or frame, read from its header before decoding."""
    max_frames: int = 64
    """Frames in one video."""
    max_request_pixels: int = 128 * 1024 * 1024
    """Pixels of all images and frames of one request together, read from their headers: bounds the
    decoding work (frames are decoded one at a time and shrunk at once, so not the memory)."""
    max_vit_patches: int = 65536
    """ViT patches of one request after the image processor's resizing, checked before decoding:
    bounds the vision tower's work and memory (a 448x448 image is 1,024 patches)."""
    max_prompt_chars: int = 131072
    """Prompt text in characters, checked before tokenizing."""
    max_prompt_tokens: int = 32768
    """Prompt length in tokens, visual placeholders included. Prefill memory is linear in it for one
    request (causal attention without a materialised mask); time is quadratic."""
    max_new_tokens: int = 1024
    """Upper bound on tokens generated for one request."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            check_field(isinstance(value, int) and value > 0, f"limits.{f.name}", value, "a positive integer")

    def check_count(self, field_name: str, n: int, what: str) -> None:
        """Raise MediaError when `n` exceeds the limit `field_name` (max_media or max_frames)."""
        limit = getattr(self, field_name)
        if n > limit:
            raise MediaError(f"{what}: {n} exceeds {field_name}={limit}")
