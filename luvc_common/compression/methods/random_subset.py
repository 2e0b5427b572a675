"""Random: a seeded uniform subset of each item's visual tokens after the tower (the floor every method must beat)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from luvc_common.compression import baselines
from luvc_common.compression.config import CompressionConfig
from luvc_common.compression.grid import grid_tokens
from luvc_common.compression.methods.base import AFTER_TOWER, Baseline, VisionTower, run_tower
from luvc_common.compression.oim import TokenGrid
from luvc_common.compression.visual import VisualTokens


@dataclass(frozen=True)
class RandomSubset(Baseline):
    acts: tuple[str, ...] = (AFTER_TOWER,)
    spec_keys: ClassVar[dict[str, str]] = {"keep": "keep_ratio", "seed": "seed"}

    def encode(self, tower: VisionTower, tokens: TokenGrid, cfg: CompressionConfig, check: Callable[[], None]) -> VisualTokens:
        out = run_tower(tower, tokens, None, check)
        pieces, cells = [], []
        for e in out.embeds.split([grid_tokens(g, tower.unit) for g in out.grids]):
            # seeded per item, not per position: an answer never depends on the requests encoded with it
            kept = baselines.random_keep(len(e), baselines.keep_count(len(e), cfg.baseline.keep_ratio), cfg.baseline.seed)
            pieces.append(e[kept.to(e.device)])
            cells.append(kept)
        return VisualTokens(torch.cat(pieces), out.grids, cells)


METHOD = RandomSubset("random")
