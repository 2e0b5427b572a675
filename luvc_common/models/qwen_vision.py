"""Qwen2-VL / Qwen2.5-VL vision tower with OIM merge steps between its blocks.

The tower's own modules (patch_embed, rotary_pos_emb, blocks, merger) do all the work; this loop
only re-derives the attention segments, rotary angles and (Qwen2.5-VL) windows whenever a merge
step has changed the grids. With no merge steps it computes exactly the stock forward.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from luvc_common.compression.oim import TokenGrid, merge_layers, merge_step, step_axes
from luvc_common.config import OIMConfig


def _run_blocks(visual, tokens: TokenGrid, blocks: range) -> Tensor:
    unit = visual.spatial_merge_size
    grid_thw = torch.tensor(tokens.grids, device=tokens.hidden.device)
    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, visual.config)
    x = tokens.hidden
    cos, sin = visual.rotary_pos_emb(x, tokens.positions)
    windowed = hasattr(visual, "fullatt_block_indexes")
    if windowed:
        window_index, cu_window = get_vision_window_index(grid_thw, unit, visual.window_size, visual.patch_size)
        max_window = get_max_seqlen(cu_window, visual.config)
        x, cos, sin = (visual.permute_input_for_window_attn(v, window_index, len(x)) for v in (x, cos, sin))
    for i in blocks:
        full = not windowed or i in visual.fullatt_block_indexes
        x = visual.blocks[i](
            x,
            cu_seqlens=cu_seqlens if full else cu_window,
            max_seqlen=max_seqlen if full else max_window,
            position_embeddings=(cos, sin),
        )
    if windowed:
        x = x.reshape(-1, unit * unit, x.shape[-1])[torch.argsort(window_index)].reshape(len(x), -1)
    return x


@torch.no_grad()
def encode(visual, pixel_values: Tensor, grid_thw: Tensor, oim: OIMConfig | None = None) -> tuple[Tensor, Tensor]:
    """Run the vision tower (with OIM when `oim` is given) and its projector.

    pixel_values: the image processor's flattened patches for all media items, in order;
    grid_thw: (n_items, 3) their patch grids. Returns (projector output (N, D), merged grid_thw),
    the merged grid being what the LLM side uses for placeholders and M-RoPE positions.
    """
    unit = visual.spatial_merge_size
    depth = len(visual.blocks)
    layers = merge_layers(oim.merge_depths, depth) if oim else []
    axes = step_axes(len(layers), oim.first_axis) if oim else []
    hidden = visual.patch_embed(pixel_values.to(visual.device))
    tokens = TokenGrid(
        hidden=hidden,
        sizes=hidden.new_ones(len(hidden), dtype=torch.float32),
        positions=get_vision_position_ids(grid_thw, unit).float().to(hidden.device),
        grids=tuple(tuple(int(v) for v in g) for g in grid_thw.tolist()),
    )
    start = 0
    for layer, axis in zip(layers, axes):
        tokens = TokenGrid(_run_blocks(visual, tokens, range(start, layer)), tokens.sizes, tokens.positions, tokens.grids)
        tokens = merge_step(tokens, axis, unit, oim.positions)
        start = layer
    hidden = _run_blocks(visual, tokens, range(start, depth))
    return visual.merger(hidden), torch.tensor(tokens.grids, dtype=torch.long)
