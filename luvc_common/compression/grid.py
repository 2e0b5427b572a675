"""Patch grids, torch-free (the CLI's parser and the client import what needs them without torch)."""
from __future__ import annotations

Grid = tuple[int, int, int]
"""(t, h, w) of a ViT patch grid."""


def grid_tokens(grid: Grid, unit: int) -> int:
    """LLM tokens of a (t, h, w) ViT grid whose unit x unit patches the projector merges into one."""
    t, h, w = grid
    return t * h * w // unit**2
