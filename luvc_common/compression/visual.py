"""The one record of visual tokens that crosses from a vision tower to a language model."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from luvc_common.compression.grid import grid_tokens


@dataclass
class VisualTokens:
    """Projector output of some media items with the grids the LLM side places them on."""

    embeds: Tensor
    """(N, D) tokens of all items, in item order."""
    grids: list[tuple[int, int, int]]
    """Per item, the (merged) ViT grid (t, h, w) its placeholders and M-RoPE positions follow."""
    cells: list[Tensor | None] | None = None
    """Per item, the raster cells of its LLM-token grid that `embeds` fills (increasing), or None when
    it fills the whole grid; None for all items when no item is a subset."""
    kinds: list[str] | None = None
    """"image" or "video" per item; None: all images."""
    source_grids: list[tuple[int, int, int]] | None = None
    """Per item, the ViT grid before merging; None: the grids (nothing merged)."""

    def __post_init__(self) -> None:
        self.cells = self.cells or [None] * len(self.grids)
        self.kinds = self.kinds or ["image"] * len(self.grids)
        self.source_grids = self.source_grids or list(self.grids)

    def grid_counts(self, unit: int) -> list[int]:
        """LLM tokens of each item's full grid: its placeholders in the prompt."""
        return [grid_tokens(g, unit) for g in self.grids]

    def token_counts(self, unit: int) -> list[int]:
        """Tokens actually present per item (rows of `embeds`)."""
        return [n if c is None else len(c) for n, c in zip(self.grid_counts(unit), self.cells)]
