"""VisionZip (Yang et al., 2024) after the vision tower: keep the dominant groups by the attention they
receive in the last block, merge the rest into contextual tokens. Qwen-VL towers have no CLS token,
so a group's saliency is the attention its patches receive, averaged over heads and all queries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from luvc_common.compression import baselines
from luvc_common.compression.config import BaselineConfig, CompressionConfig
from luvc_common.compression.methods.base import AFTER_TOWER, Baseline, VisionTower, split_items, units
from luvc_common.compression.oim import TokenGrid
from luvc_common.compression.visual import VisualTokens


def zip_item(tower: VisionTower, item: TokenGrid, cfg: BaselineConfig, check: Callable[[], None]) -> tuple[Tensor, Tensor]:
    """Returns (features (n_kept * unit^2, C) before the projector, kept group indices)."""
    unit, last = tower.unit, tower.depth - 1
    x_last = tower.run_blocks(item, range(last), check)
    received = tower.attention_received(last, x_last, item.positions)
    x = tower.run_blocks(TokenGrid(x_last, item.sizes, item.positions, item.grids), range(last, tower.depth), check)
    keep = baselines.keep_count(len(x) // unit**2, cfg.keep_ratio)
    dominant = round(cfg.dominant * keep)
    metric = units(tower.keys(last, x_last).mean(1), unit).mean(1)
    merged, kept = baselines.visionzip_merge(units(x, unit), units(received, unit).sum(1), metric, dominant, keep - dominant)
    return merged.flatten(0, 1), kept.cpu()


@dataclass(frozen=True)
class VisionZip(Baseline):
    acts: tuple[str, ...] = (AFTER_TOWER,)
    spec_keys: ClassVar[dict[str, str]] = {"keep": "keep_ratio", "dominant": "dominant"}

    def encode(self, tower: VisionTower, tokens: TokenGrid, cfg: CompressionConfig, check: Callable[[], None]) -> VisualTokens:
        outs = [zip_item(tower, item, cfg.baseline, check) for item in split_items(tokens)]
        return VisualTokens(torch.cat([tower.project(x) for x, _ in outs]), list(tokens.grids), [kept for _, kept in outs])


METHOD = VisionZip("visionzip")
