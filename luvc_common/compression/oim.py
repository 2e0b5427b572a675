"""Orthogonal Iterative Merger (OIM): pure tensor functions, no model or I/O.

Patch tokens of each media item live on a (t, h, w) grid. A merge step averages adjacent pairs
(triples at the end of an axis whose half is not a multiple of the projector's unit) along ONE
spatial axis (weighted by how many original patches each token stands for), so the grid
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

from luvc_common.compression.grid import Grid

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
    """Length of an axis of n tokens after one step: half, rounded down to a multiple of `unit`.

    The projector needs every grid side to be a multiple of `unit`; when n / 2 is not, the last
    groups merge three tokens instead of two, so a step never keeps more than half the tokens.
    An axis of a single unit cannot shrink.
    """
    return max(unit, n // 2 // unit * unit)


def group_index(n: int, out_len: int) -> Tensor:
    """(n,) output slot of each input token: pairs first, then triples (or singles) at the end."""
    if 2 * out_len >= n:  # cannot halve: the last 2*out_len - n tokens stay single
        sizes = [2] * (n - out_len) + [1] * (2 * out_len - n)
    else:
        sizes = [2] * (3 * out_len - n) + [3] * (n - 2 * out_len)
    return torch.repeat_interleave(torch.arange(out_len), torch.tensor(sizes))


def merge_groups(values: list[Tensor], sizes: Tensor, axis: int, out_len: int) -> tuple[list[Tensor], Tensor]:
    """Size-weighted mean of adjacent groups (see group_index) along `axis` of (t, h, w, ...) tensors.

    `sizes` is (t, h, w): original patches per token; the merged sizes are their sums.
    """
    index = group_index(sizes.shape[axis], out_len).to(sizes.device)
    s = sizes.movedim(axis, 0).float()
    new_sizes = s.new_zeros(out_len, *s.shape[1:]).index_add_(0, index, s)
    merged = []
    for v in values:
        v = v.movedim(axis, 0)
        w = s.reshape(*s.shape, *([1] * (v.dim() - 3)))
        total = v.new_zeros(out_len, *v.shape[1:], dtype=torch.float32).index_add_(0, index, v.float() * w)
        merged.append((total / new_sizes.reshape(*new_sizes.shape, *([1] * (v.dim() - 3)))).to(v.dtype).movedim(0, axis))
    return merged, new_sizes.movedim(0, axis)


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
        (x, p), s = merge_groups(
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
