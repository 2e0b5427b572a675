"""Validated configuration of the compression methods and the method specs that name them.

Depths are given relative to the network (0.0 = before the first layer, 1.0 = after the last) so one
setting means the same thing on a 4-layer test model and a 28-layer production model; the resolved
layer indices are reported with every result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from luvc_common.config import check_field

MAX_STEPS = 16
"""Most OIM merge steps, and most SPU stages: a bound on client-chosen work (each merge step halves an axis, down to
one projector unit, so a few steps already reach any real grid's floor)."""


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
    llm_positions: str = "merged"
    """The LLM's M-RoPE positions of merged media: "merged" (those of the merged grid, DESIGN 2.1) or
    "source" (the merged grid spread evenly over the source grid's span, each token at the mean position of the
    source cells it stands for when the sides divide evenly, and the text after the media where it follows the
    unmerged grid: the image keeps its positional extent; Qwen-family LLMs)."""

    def __post_init__(self) -> None:
        d = tuple(float(x) for x in self.merge_depths)
        object.__setattr__(self, "merge_depths", d)
        check_field(0 < len(d) <= MAX_STEPS, "oim.merge_depths", d, f"1 to {MAX_STEPS} steps (OIM off: oim=None, spec merges=none)")
        check_field(all(0.0 <= x <= 1.0 for x in d), "oim.merge_depths", d, "values in [0, 1]")
        check_field(list(d) == sorted(d), "oim.merge_depths", d, "non-decreasing values")
        check_field(self.first_axis in ("w", "h"), "oim.first_axis", self.first_axis, '"w" or "h"')
        check_field(self.positions in ("mean", "grid"), "oim.positions", self.positions, '"mean" or "grid"')
        check_field(self.llm_positions in ("merged", "source"), "oim.llm_positions", self.llm_positions, '"merged" or "source"')


@dataclass(frozen=True)
class SPUConfig:
    """Spectrum Pruning Unit cascade inside the LLM decoder (DESIGN 2.2)."""

    stages: tuple[tuple[float, float], ...] = ((0.34, 0.34), (0.67, 0.0))
    """(relative LLM depth in (0, 1), keep ratio in [0, 1]) pairs: before the layer at that depth the
    visual tokens of each media item are cut to keep_ratio x their count at the LLM input. Depths
    strictly increase, ratios never increase, and the last ratio is 0 so no visual token reaches the
    final layer. The defaults of this class (stages, cutoff, window) were the most accurate setting at
    >= 2x theoretical LLM FLOPs in the validation ablation (tools/sweep_defaults.py, docs/results.md). They
    resolve to distinct layers on LLMs of 4 or more layers; on shallower ones, stages that round to one layer act
    as one at the strictest ratio (spu.stage_layers)."""
    cutoff: float = 0.5
    """Low-pass cutoff as a fraction of the spatial frequency band, in (0, 1)."""
    window: str = "gaussian"
    """Low-pass window: "ideal" (box) or "gaussian" (smooth, sigma = cutoff x half band)."""
    mode: str = "select"
    """"select": keep the tokens with the largest high-frequency residual (the rest are dropped);
    "resample": truncate the spectrum and invert onto a smaller grid (tokens are fused)."""

    def __post_init__(self) -> None:
        s = tuple((float(d), float(r)) for d, r in self.stages)
        object.__setattr__(self, "stages", s)
        check_field(0 < len(s) <= MAX_STEPS, "spu.stages", s, f"1 to {MAX_STEPS} (depth, keep_ratio) stages")
        depths, ratios = [d for d, _ in s], [r for _, r in s]
        check_field(all(0.0 < d < 1.0 for d in depths), "spu.stages depth", depths, "values in (0, 1)")
        check_field(all(a < b for a, b in zip(depths, depths[1:])), "spu.stages depth", depths, "strictly increasing")
        check_field(all(0.0 <= r <= 1.0 for r in ratios), "spu.stages keep_ratio", ratios, "values in [0, 1]")
        check_field(all(a >= b for a, b in zip(ratios, ratios[1:])), "spu.stages keep_ratio", ratios, "non-increasing")
        check_field(ratios[-1] == 0.0, "spu.stages keep_ratio", ratios, "a last stage with keep_ratio 0")
        check_field(0.0 < self.cutoff < 1.0, "spu.cutoff", self.cutoff, "a value in (0, 1)")
        check_field(self.window in ("ideal", "gaussian"), "spu.window", self.window, '"ideal" or "gaussian"')
        check_field(self.mode in ("select", "resample"), "spu.mode", self.mode, '"select" or "resample"')


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
        check_field(0.0 < self.keep_ratio <= 1.0, "keep_ratio", self.keep_ratio, "a value in (0, 1]")
        check_field(0.0 <= self.layer < 1.0, "layer", self.layer, "a relative depth in [0, 1)")
        check_field(0.0 <= self.dominant <= 1.0, "dominant", self.dominant, "a value in [0, 1]")
        object.__setattr__(self, "pivots", tuple(int(v) for v in self.pivots))
        check_field(len(self.pivots) == 2 and min(self.pivots) >= 0, "pivots", self.pivots, "(image, text) counts >= 0")
        check_field(0 <= self.seed < 2**63, "seed", self.seed, "an integer in [0, 2**63)")


@dataclass(frozen=True)
class CompressionConfig:
    """Which visual-token compression a request uses, with its knobs."""

    method: str = "luvc"
    """Method name: one of compression.methods.NAMES."""
    oim: OIMConfig | None = None
    """Vision-side merging; None disables it. Off by default: every OIM setting in the validation ablation cost
    far more accuracy than SPU alone at the same FLOPs (docs/results.md). Turn it on (spec "luvc:merges=0.5")
    where the encoder-to-LLM payload matters more: one merge step halves it."""
    spu: SPUConfig | None = field(default_factory=SPUConfig)
    """LLM-side pruning cascade; None disables it."""
    baseline: BaselineConfig | None = None
    """Budget of a baseline method; set exactly when the method is budgeted."""

    def __post_init__(self) -> None:
        from luvc_common.compression.methods import get  # the method modules import this one

        budgeted = get(self.method).budgeted
        check_field((self.baseline is not None) == budgeted, "baseline", self.baseline,
                    f"{'a BaselineConfig' if budgeted else 'None'} for method {self.method!r}")
        if budgeted:
            check_field(self.oim is None and self.spu is None, "method", self.method, "a baseline without oim or spu")
