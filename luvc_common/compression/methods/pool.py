"""Average pooling of each item's LLM-token grid after the tower: one 2x step per halving of the keep
ratio, axes alternating (w first)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from luvc_common.compression.config import CompressionConfig
from luvc_common.compression.grid import Grid, grid_tokens
from luvc_common.compression.methods.base import AFTER_TOWER, Baseline, VisionTower, run_tower
from luvc_common.compression.oim import TokenGrid, merge_step, step_axes
from luvc_common.compression.visual import VisualTokens


def pool_item(embeds: Tensor, grid: Grid, unit: int, keep_ratio: float) -> tuple[Tensor, Grid]:
    """Returns (pooled tokens, pooled ViT grid)."""
    t, h, w = grid
    tokens = TokenGrid(embeds, embeds.new_ones(len(embeds)), embeds.new_zeros(len(embeds), 2), ((t, h // unit, w // unit),))
    for axis in step_axes(round(math.log2(1 / keep_ratio)), "w"):
        tokens = merge_step(tokens, axis, 1, "grid")
    (t, h, w), = tokens.grids
    return tokens.hidden, (t, h * unit, w * unit)


@dataclass(frozen=True)
class Pool(Baseline):
    acts: tuple[str, ...] = (AFTER_TOWER,)

    def encode(self, tower: VisionTower, tokens: TokenGrid, cfg: CompressionConfig, check: Callable[[], None]) -> VisualTokens:
        out = run_tower(tower, tokens, None, check)
        pooled = [pool_item(e, g, tower.unit, cfg.baseline.keep_ratio)
                  for e, g in zip(out.embeds.split([grid_tokens(g, tower.unit) for g in out.grids]), out.grids)]
        return VisualTokens(torch.cat([e for e, _ in pooled]), [g for _, g in pooled])

    def budget(self, cfg: CompressionConfig, keep_ratio: float) -> CompressionConfig:
        """Pooling keeps a power of 1/2: the nearest one."""
        return super().budget(cfg, 0.5 ** max(1, round(-math.log2(keep_ratio))))


METHOD = Pool("pool")
