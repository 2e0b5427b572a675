"""ToMe (Bolya et al., 2023) in the vision tower: after each block, bipartite soft matching on the
block's keys merges r projector groups (size-weighted); attention is proportional to size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from luvc_common.compression import baselines
from luvc_common.compression.config import CompressionConfig
from luvc_common.compression.grid import grid_tokens
from luvc_common.compression.methods.base import VISION_BLOCKS, Baseline, VisionTower, split_items, units
from luvc_common.compression.oim import TokenGrid
from luvc_common.compression.visual import VisualTokens
from luvc_common.errors import ConfigError


def merge_through_tower(tower: VisionTower, frame: TokenGrid, keep_ratio: float) -> tuple[Tensor, Tensor]:
    """One frame through every block with merging. Returns (features (n_kept * unit^2, C) before the
    projector, kept group indices)."""
    unit = tower.unit
    x, pos = frame.hidden, frame.positions
    n = len(x) // unit**2
    kept, sizes = torch.arange(n), torch.ones(n, device=x.device)
    for block, r in enumerate(baselines.tome_schedule(n, baselines.keep_count(n, keep_ratio), tower.depth)):
        x_in, x = x, tower.proportional_block(block, x, pos, sizes.log().repeat_interleave(unit**2))
        if r:
            src, dst = baselines.bipartite_soft_matching(units(tower.keys(block, x_in).mean(1), unit).mean(1), r)
            merged, sizes, idx = baselines.merge_into(units(x, unit), sizes, src, dst)
            x, pos, kept = merged.flatten(0, 1), units(pos, unit)[idx].flatten(0, 1), kept[idx.cpu()]
    return x, kept


@dataclass(frozen=True)
class ToMe(Baseline):
    acts: tuple[str, ...] = (VISION_BLOCKS,)

    def encode(self, tower: VisionTower, tokens: TokenGrid, cfg: CompressionConfig, check: Callable[[], None]) -> VisualTokens:
        if not tower.full_attention:
            raise ConfigError("method tome needs a vision tower with full attention in every block (e.g. Qwen2-VL); "
                              "window attention (Qwen2.5-VL) needs whole windows")
        embeds, cells = [], []
        for item in split_items(tokens):  # per frame: a video's frames are separate attention segments
            t, h, w = item.grids[0]
            frames = TokenGrid(item.hidden, item.sizes, item.positions, ((1, h, w),) * t)
            outs = []
            for frame in split_items(frames):
                check()
                outs.append(merge_through_tower(tower, frame, cfg.baseline.keep_ratio))
            embeds += [tower.project(x) for x, _ in outs]
            cells.append(torch.cat([f * grid_tokens((1, h, w), tower.unit) + kept for f, (_, kept) in enumerate(outs)]))
        return VisualTokens(torch.cat(embeds), list(tokens.grids), cells)


METHOD = ToMe("tome")
