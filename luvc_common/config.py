"""Configuration shared by every layer: request limits, and the helpers that validate config dataclasses
and turn their field docstrings into CLI help."""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import Field, dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_type_hints


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


@dataclass(frozen=True)
class Leaf:
    """One scalar field of a config tree, as a flag and a builder arg see it."""

    name: str
    """Flag / arg name: the field's `flag` metadata, else its name (--max-media, max_media)."""
    path: tuple[str, ...]
    """Field names from the root to this field."""
    field: Field
    env: str | None
    """Environment variable that overrides the default: the field's `env` metadata, or the `env_prefix`
    metadata of an enclosing field + NAME (LUVC_MAX_MEDIA)."""
    doc: str
    kind: type
    """The field's type (int for `int | None`): what a flag's text is converted to."""


def leaves(cls: type, path: tuple[str, ...] = (), env_prefix: str | None = None) -> list[Leaf]:
    """The scalar fields of a config dataclass tree (nested config dataclasses flattened), names unique."""
    out, docs = [], field_docs(cls)
    for f in fields(cls):
        if is_dataclass(type(f.default)) and not isinstance(f.default, type):
            out += leaves(type(f.default), (*path, f.name), f.metadata.get("env_prefix", env_prefix))
        else:
            env = f.metadata.get("env") or (f"{env_prefix}{f.name.upper()}" if env_prefix else None)
            out.append(Leaf(f.metadata.get("flag", f.name), (*path, f.name), f, env, docs[f.name], _kinds(cls)[f.name]))
    names = [leaf.name for leaf in out]
    assert len(names) == len(set(names)), f"{cls.__name__}: repeated leaf names {names}"
    return out


@cache
def _kinds(cls: type) -> dict[str, type]:
    """Field name -> its type, with `X | None` read as X."""
    hints = get_type_hints(cls)
    return {name: next((a for a in get_args(t) if a is not type(None)), t) for name, t in hints.items()}


def build(cls: type, values: dict[str, Any]):
    """A config dataclass tree from leaf-name -> value (a CLI namespace, a Ray Serve builder's YAML args):
    each value is converted to its field's default type; leaves absent from `values` keep their defaults."""
    kwargs = {}
    for f in fields(cls):
        if is_dataclass(type(f.default)) and not isinstance(f.default, type):
            kwargs[f.name] = build(type(f.default), values)
        else:
            name = f.metadata.get("flag", f.name)
            if values.get(name) is not None:
                kwargs[f.name] = _kinds(cls)[f.name](values[name])
    return cls(**kwargs)


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


WIRE_DTYPES = ("BF16", "FP16", "FP32")
"""Dtypes visual tokens can cross the wire in (serving/wire.py)."""


@dataclass(frozen=True)
class ModelConfig:
    """Where a model comes from and how it runs."""

    path: str = field(default=str(DEFAULT_MODEL), metadata={"flag": "model"})
    """Local HF checkpoint directory (config.json, *.safetensors, tokenizer, preprocessor config)."""
    dtype: str = "auto"
    """Compute dtype: float32, bfloat16, float16, or auto (bfloat16 on GPU, float32 on CPU)."""
    device: str = "auto"
    """torch device (cpu, cuda, cuda:N), or auto (cuda when available, else cpu)."""
    attn_implementation: str = "auto"
    """transformers attention implementation; auto = flash_attention_2 on GPU when installed, else sdpa."""
