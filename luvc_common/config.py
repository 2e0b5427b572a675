"""Validated configuration dataclasses for the compression methods and the limits of a request.

Depths are given relative to the network (0.0 = before the first layer, 1.0 = after the last) so one
setting means the same thing on a 4-layer test model and a 28-layer production model; the resolved
layer indices are reported with every result.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


from luvc_common.errors import ConfigError, MediaError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "luvc-tiny-qwen2vl"
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
"""Files read as video frames from a directory."""


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {allowed}")


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
class CompressionConfig:
    """Which visual-token compression a request uses, with its knobs."""

    method: str = "luvc"
    """Method name: one of METHOD_NAMES."""
    oim: OIMConfig | None = field(default_factory=OIMConfig)
    """Vision-side merging; None disables it."""
    spu: SPUConfig | None = field(default_factory=SPUConfig)
    """LLM-side pruning cascade; None disables it."""

    def __post_init__(self) -> None:
        _check(self.method in METHOD_NAMES, "method", self.method, f"one of {list(METHOD_NAMES)}")


METHOD_NAMES = ("none", "luvc")


def method_config(name: str, **overrides: Any) -> CompressionConfig:
    """The default configuration of method `name`, with optional field overrides."""
    _check(name in METHOD_NAMES, "method", name, f"one of {list(METHOD_NAMES)}")
    base = CompressionConfig(method=name, oim=None, spu=None) if name == "none" else CompressionConfig(method=name)
    return replace(base, **overrides)


@dataclass(frozen=True)
class Limits:
    """Per-request input limits; exceeding one is a clear error, never a crash."""

    max_media: int = 8
    """Images plus videos in one request."""
    max_image_pixels: int = 4096 * 4096
    """Decoded pixels (width x height) of one image or frame, checked before resizing."""
    max_frames: int = 64
    """Frames in one video."""
    max_prompt_tokens: int = 32768
    """Prompt length in tokens, visual placeholders included."""
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

