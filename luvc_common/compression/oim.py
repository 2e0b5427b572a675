"""Orthogonal Iterative Merger (OIM): pure tensor functions, no model or I/O.

Patch tokens of each media item live on a (t, h, w) grid. A merge step averages adjacent pairs
along ONE spatial axis (weighted by how many original patches each token stands for), so the grid
stays rectangular and the vision tower's 2D rotary embedding, window attention and 2x2 projector
keep working. Steps alternate between the width ("lateral") and height ("longitudinal") axes.

Sequence order: Qwen-VL vision towers lay tokens out "block-major" - grouped in unit x unit blocks
(the projector's merge windows), blocks in raster order. Merging works on the raster grid, so
tokens are converted to it and back around each step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Grid = tuple[int, int, int]
AXES = {"h": 1, "w": 2}


@dataclass(frozen=True)
class TokenGrid:
    """Visual tokens of several media items, each on its own grid, in block-major order."""

    hidden: Tensor
    """(N, C) token features."""
    sizes: Tensor
    """(N,) float: original patches each token stands for."""
    positions: Tensor
    """(N, 2) float: (h, w) rotary coordinates of each token."""
    grids: tuple[Grid, ...]
    """(t, h, w) per item; sum of t*h*w equals N."""


def block_major_to_raster(x: Tensor, grid: Grid, unit: int) -> Tensor:
    """(t*h*w, ...) in block-major order -> (t, h, w, ...)."""
    t, h, w = grid
    rest = x.shape[1:]
    x = x.reshape(t, h // unit, w // unit, unit, unit, *rest)
    return x.transpose(2, 3).reshape(t, h, w, *rest)


def raster_to_block_major(x: Tensor, unit: int) -> Tensor:
    """(t, h, w, ...) -> (t*h*w, ...) in block-major order."""
    t, h, w = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(t, h // unit, unit, w // unit, unit, *rest)
    return x.transpose(2, 3).reshape(t * h * w, *rest)


def merged_length(n: int, unit: int) -> int:
    """Length of an axis of n tokens after one step: about half, kept a multiple of `unit`.

    Pairs are merged from the start of the axis; the last (2 * out - n) tokens stay single when
    exact halving would break divisibility by `unit`. An axis of one unit cannot shrink.
    """
    half = -(-n // 2)
    return min(n, -(-half // unit) * unit)


def merge_pairs(values: list[Tensor], sizes: Tensor, axis: int, out_len: int) -> tuple[list[Tensor], Tensor]:
    """Size-weighted mean of adjacent pairs along `axis` of (t, h, w, ...) tensors.

    The first n - out_len pairs are merged; the remaining tokens pass through. `sizes` is (t, h, w).
    """
    n = sizes.shape[axis]
    pairs = n - out_len
    s = sizes.movedim(axis, 0)
    s_pair = s[: 2 * pairs].reshape(pairs, 2, *s.shape[1:])
    new_sizes = torch.cat([s_pair.sum(1), s[2 * pairs :]]).movedim(0, axis)
    merged = []
    for v in values:
        v = v.movedim(axis, 0)
        v_pair = v[: 2 * pairs].reshape(pairs, 2, *v.shape[1:])
        w = s_pair.reshape(*s_pair.shape, *([1] * (v.dim() - 3))).float()
        mean = ((v_pair.float() * w).sum(1) / w.sum(1)).to(v.dtype)
        merged.append(torch.cat([mean, v[2 * pairs :]]).movedim(0, axis))
    return merged, new_sizes


def grid_positions(grid: Grid, unit: int) -> Tensor:
    """(t*h*w, 2) float integer (h, w) coordinates of a grid, in block-major order."""
    t, h, w = grid
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([hh, ww], -1).float().expand(t, h, w, 2)
    return raster_to_block_major(pos, unit)


def merge_step(tokens: TokenGrid, axis: str, unit: int, positions: str = "mean") -> TokenGrid:
    """One OIM step on every item: merge adjacent pairs along `axis` ("h" or "w")."""
    dim = AXES[axis]
    counts = [t * h * w for t, h, w in tokens.grids]
    parts = zip(tokens.hidden.split(counts), tokens.sizes.split(counts), tokens.positions.split(counts), tokens.grids)
    hidden, sizes, pos, grids = [], [], [], []
    for x, s, p, grid in parts:
        out_len = merged_length(grid[dim], unit)
        (x, p), s = merge_pairs(
            [block_major_to_raster(x, grid, unit), block_major_to_raster(p, grid, unit)],
            block_major_to_raster(s, grid, unit),
            dim,
            out_len,
        )
        new_grid = tuple(out_len if i == dim else g for i, g in enumerate(grid))
        hidden.append(raster_to_block_major(x, unit))
        sizes.append(raster_to_block_major(s, unit))
        pos.append(raster_to_block_major(p, unit) if positions == "mean" else grid_positions(new_grid, unit))
        grids.append(new_grid)
    return TokenGrid(torch.cat(hidden), torch.cat(sizes), torch.cat(pos).to(tokens.positions), tuple(grids))


def step_axes(num_steps: int, first_axis: str) -> list[str]:
    """Alternating axes for `num_steps` steps, starting with `first_axis`."""
    other = "h" if first_axis == "w" else "w"
    return [first_axis if i % 2 == 0 else other for i in range(num_steps)]


def merge_layers(merge_depths: tuple[float, ...], depth: int) -> list[int]:
    """Block indices before which each merge step runs (depth = after the last block)."""
    return [round(d * depth) for d in merge_depths]
