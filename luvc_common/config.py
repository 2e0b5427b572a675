"""Validated configuration dataclasses for the compression methods and the limits of a request.

Depths are given relative to the network (0.0 = before the first layer, 1.0 = after the last) so one
setting means the same thing on a 4-layer test model and a 28-layer production model; the resolved
layer indices are reported with every result.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import MISSING, dataclass, field, fields, replace
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


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={shorten(repr(value))} is invalid: expected {allowed}")


@dataclass(frozen=True)
class OIMConfig:
    """Orthogonal Iterative Merger: pairwise merging inside the vision tower (DESIGN 2.1)."""

    merge_depths: tuple[float, ...] = (0.5,)
    """Relative ViT depths in [0, 1] at which a merge step runs, non-decreasing; one step per entry.
    Each step halves one grid axis, so k steps divide the visual tokens by about 2**k."""
    first_axis: str = "w"
    """Axis of the first step: "w" (lateral, halves the width) or "h" (longitudinal); steps alternate."""
    positions: str = "mean"
    """Rotary positions of merged tokens: "mean" (mean of the merged patches' coordinates) or "grid"
    (the merged grid's own integer coordinates)."""

    def __post_init__(self) -> None:
        d = tuple(float(x) for x in self.merge_depths)
        object.__setattr__(self, "merge_depths", d)
        _check(all(0.0 <= x <= 1.0 for x in d), "oim.merge_depths", d, "values in [0, 1]")
        _check(list(d) == sorted(d), "oim.merge_depths", d, "non-decreasing values")
        _check(self.first_axis in ("w", "h"), "oim.first_axis", self.first_axis, '"w" or "h"')
        _check(self.positions in ("mean", "grid"), "oim.positions", self.positions, '"mean" or "grid"')


@dataclass(frozen=True)
class SPUConfig:
    """Spectrum Pruning Unit cascade inside the LLM decoder (DESIGN 2.2)."""

    stages: tuple[tuple[float, float], ...] = ((0.25, 0.5), (0.5, 0.25), (0.75, 0.0))
    """(relative LLM depth in (0, 1), keep ratio in [0, 1]) pairs: before the layer at that depth the
    visual tokens of each media item are cut to keep_ratio x their count at the LLM input. Depths
    strictly increase, ratios never increase, and the last ratio is 0 so no visual token reaches the
    final layer."""
    cutoff: float = 0.25
    """Low-pass cutoff as a fraction of the spatial frequency band, in (0, 1)."""
    window: str = "ideal"
    """Low-pass window: "ideal" (box) or "gaussian" (smooth, sigma = cutoff x half band)."""
    mode: str = "select"
    """"select": keep the tokens with the largest high-frequency residual (the rest are dropped);
    "resample": truncate the spectrum and invert onto a smaller grid (tokens are fused)."""

    def __post_init__(self) -> None:
        s = tuple((float(d), float(r)) for d, r in self.stages)
        object.__setattr__(self, "stages", s)
        _check(len(s) > 0, "spu.stages", s, "at least one (depth, keep_ratio) stage")
        depths, ratios = [d for d, _ in s], [r for _, r in s]
        _check(all(0.0 < d < 1.0 for d in depths), "spu.stages depth", depths, "values in (0, 1)")
        _check(all(a < b for a, b in zip(depths, depths[1:])), "spu.stages depth", depths, "strictly increasing")
        _check(all(0.0 <= r <= 1.0 for r in ratios), "spu.stages keep_ratio", ratios, "values in [0, 1]")
        _check(all(a >= b for a, b in zip(ratios, ratios[1:])), "spu.stages keep_ratio", ratios, "non-increasing")
        _check(ratios[-1] == 0.0, "spu.stages keep_ratio", ratios, "a last stage with keep_ratio 0")
        _check(0.0 < self.cutoff < 1.0, "spu.cutoff", self.cutoff, "a value in (0, 1)")
        _check(self.window in ("ideal", "gaussian"), "spu.window", self.window, '"ideal" or "gaussian"')
        _check(self.mode in ("select", "resample"), "spu.mode", self.mode, '"select" or "resample"')


@dataclass(frozen=True)
class BaselineConfig:
    """Token budget and knobs of the baseline methods (luvc_common/compression/baselines.py)."""

    keep_ratio: float = 0.25
    """Visual tokens kept, as a fraction of the uncompressed count, in (0, 1]. "pool" rounds it to
    a power of 1/2 (one 2x pooling step per halving, axes alternating)."""
    layer: float = 2 / 28
    """fastv, dart: relative LLM depth of the pruning layer K (the papers' K=2 of 28 layers); it
    resolves to at least layer 1, since the scores come from layer K-1."""
    dominant: float = 54 / 64
    """visionzip: share of the kept tokens that are dominant (the paper's 54 of 64); the rest are
    contextual."""
    pivots: tuple[int, int] = (4, 4)
    """dart: (image, text) pivot tokens (the official default)."""
    seed: int = 0
    """random: seed of the kept subset."""

    def __post_init__(self) -> None:
        _check(0.0 < self.keep_ratio <= 1.0, "keep_ratio", self.keep_ratio, "a value in (0, 1]")
        _check(0.0 <= self.layer < 1.0, "layer", self.layer, "a relative depth in [0, 1)")
        _check(0.0 <= self.dominant <= 1.0, "dominant", self.dominant, "a value in [0, 1]")
        object.__setattr__(self, "pivots", tuple(int(v) for v in self.pivots))
        _check(len(self.pivots) == 2 and min(self.pivots) >= 0, "pivots", self.pivots, "(image, text) counts >= 0")
        _check(0 <= self.seed < 2**63, "seed", self.seed, "an integer in [0, 2**63)")


@dataclass(frozen=True)
class CompressionConfig:
    """Which visual-token compression a request uses, with its knobs."""

    method: str = "luvc"
    """Method name: one of METHOD_NAMES."""
    oim: OIMConfig | None = field(default_factory=OIMConfig)
    """Vision-side merging; None disables it."""
    spu: SPUConfig | None = field(default_factory=SPUConfig)
    """LLM-side pruning cascade; None disables it."""
    baseline: BaselineConfig | None = None
    """Budget of a baseline method; set exactly when `method` is one of BASELINES."""

    def __post_init__(self) -> None:
        _check(self.method in METHOD_NAMES, "method", self.method, f"one of {list(METHOD_NAMES)}")
        is_baseline = self.method in BASELINES
        _check((self.baseline is not None) == is_baseline, "baseline", self.baseline,
               f"{'a BaselineConfig' if is_baseline else 'None'} for method {self.method!r}")
        if is_baseline:
            _check(self.oim is None and self.spu is None, "method", self.method, "a baseline without oim or spu")


VISION_BASELINES = ("tome", "visionzip", "pool", "random")
"""Baselines that act in the encoder: fewer tokens cross the wire."""
LLM_BASELINES = ("fastv", "dart")
"""Baselines that prune inside the LLM."""
BASELINES = VISION_BASELINES + LLM_BASELINES
METHOD_NAMES = ("none", "luvc") + BASELINES

MAX_SPEC_CHARS = 200
"""Longest method spec accepted."""
_SPEC_KEYS = {"keep": ("keep_ratio", float), "layer": ("layer", float), "dominant": ("dominant", float),
              "seed": ("seed", int)}


def method_config(spec: str, **overrides: Any) -> CompressionConfig:
    """The configuration of a method spec, with optional field overrides.

    A spec is a method name, optionally with baseline knobs: "fastv", "tome:keep=0.125",
    "dart:keep=0.25,layer=0.1", "random:keep=0.5,seed=3" (keys: keep, layer, dominant, seed).
    """
    _check(len(spec) <= MAX_SPEC_CHARS, "method", spec, f"a spec of at most {MAX_SPEC_CHARS} characters")
    name, _, args = spec.strip().partition(":")
    _check(name in METHOD_NAMES, "method", name, f"one of {list(METHOD_NAMES)}")
    knobs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        _check(name in BASELINES and key in _SPEC_KEYS and eq == "=", "method", spec,
               f"name[:key=value,...] with keys {list(_SPEC_KEYS)} for baselines {list(BASELINES)}")
        field_name, kind = _SPEC_KEYS[key]
        _check(field_name not in knobs, "method", spec, f"each key at most once ({key} is repeated)")
        try:
            knobs[field_name] = kind(value)
        except ValueError:
            raise ConfigError(f"method={shorten(repr(spec))}: {key}={shorten(repr(value))} is not a {kind.__name__}") from None
    if name == "luvc":
        base = CompressionConfig(method=name)
    else:
        base = CompressionConfig(method=name, oim=None, spu=None, baseline=BaselineConfig(**knobs) if name in BASELINES else None)
    return replace(base, **overrides)


def budget_unset(spec: str) -> bool:
    """A baseline spec without keep=: eval and bench give it the reference method's theoretical FLOPs ratio."""
    name, _, args = spec.strip().partition(":")
    return name in BASELINES and not any(a.strip().startswith("keep=") for a in args.split(","))


def method_spec(cfg: CompressionConfig) -> str:
    """The spec string that method_config parses back to `cfg`'s method and baseline budget."""
    if cfg.baseline is None:
        return cfg.method
    default = BaselineConfig()
    knobs = [f"{key}={getattr(cfg.baseline, name)!r}" for key, (name, _) in _SPEC_KEYS.items()
             if getattr(cfg.baseline, name) != getattr(default, name)]
    return f"{cfg.method}:{','.join(knobs)}" if knobs else cfg.method


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
            _check(isinstance(value, int) and value > 0, f"limits.{f.name}", value, "a positive integer")

    def check_count(self, field_name: str, n: int, what: str) -> None:
        """Raise MediaError when `n` exceeds the limit `field_name` (max_media or max_frames)."""
        limit = getattr(self, field_name)
        if n > limit:
            raise MediaError(f"{what}: {n} exceeds {field_name}={limit}")
