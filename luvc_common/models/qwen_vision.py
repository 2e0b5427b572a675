"""Qwen2-VL / Qwen2.5-VL vision tower with OIM merge steps (or a vision-side baseline) inside.

The tower's own modules (patch_embed, rotary_pos_emb, blocks, merger) do all the work; this loop
only re-derives the attention segments, rotary angles and (Qwen2.5-VL) windows whenever a merge
step has changed the grids. With no merge steps it computes exactly the stock forward.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from luvc_common.compression import baselines
from luvc_common.compression.grid import grid_tokens
from luvc_common.compression.oim import TokenGrid, merge_layers, merge_step, step_axes
from luvc_common.config import BaselineConfig, CompressionConfig
from luvc_common.errors import ConfigError
from luvc_common.models.visual import VisualTokens


def _proportional_block(block, x: Tensor, position_embeddings: tuple[Tensor, Tensor], size_log: Tensor) -> Tensor:
    """One vision block over one segment with ToMe's proportional attention: log(size) of each key
    added to the attention logits. The block's own modules; the bias travels with the call."""
    attn = block.attn
    q, k, v = attn.qkv(block.norm1(x)).reshape(len(x), 3, attn.num_heads, -1).unbind(1)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=size_log.to(q.dtype)[None, None, None, :], scale=attn.scaling)
    x = x + attn.proj(out[0].transpose(0, 1).reshape(len(x), -1))
    return x + block.mlp(block.norm2(x))


def _run_blocks(visual, tokens: TokenGrid, blocks: range, check: Callable[[], None] = lambda: None) -> Tensor:
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
        check()
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


def _keys(block, x: Tensor) -> Tensor:
    """(N, heads, head_dim) attention keys of a vision block on its input x, before rotary."""
    return block.attn.qkv(block.norm1(x)).reshape(len(x), 3, block.attn.num_heads, -1)[:, 1]


def _units(x: Tensor, unit: int) -> Tensor:
    """(N, ...) block-major tokens -> (N / unit^2, unit^2, ...): one row per projector group = LLM token."""
    return x.reshape(-1, unit * unit, *x.shape[1:])


def _split(tokens: TokenGrid) -> list[TokenGrid]:
    counts = [t * h * w for t, h, w in tokens.grids]
    return [TokenGrid(*parts, (g,)) for *parts, g in zip(*(v.split(counts) for v in (tokens.hidden, tokens.sizes, tokens.positions)), tokens.grids)]


def _frames(item: TokenGrid) -> TokenGrid:
    """One item's t frames as t items of one frame each (block-major order keeps frames contiguous)."""
    t, h, w = item.grids[0]
    return TokenGrid(item.hidden, item.sizes, item.positions, ((1, h, w),) * t)


def _tome(visual, item: TokenGrid, keep_ratio: float) -> tuple[Tensor, Tensor]:
    """ToMe through the tower's blocks for one item: after each block, bipartite soft matching on the
    block's keys merges r projector groups (size-weighted); attention is proportional to size.
    Returns (features (n_kept * unit^2, C) before the projector, kept group indices)."""
    if hasattr(visual, "fullatt_block_indexes"):
        raise ConfigError("method tome needs a vision tower with full attention in every block (Qwen2-VL); "
                          "Qwen2.5-VL's window attention needs whole windows")
    unit = visual.spatial_merge_size
    x, pos = item.hidden, item.positions
    n = len(x) // unit**2
    kept, sizes = torch.arange(n), torch.ones(n, device=x.device)
    schedule = baselines.tome_schedule(n, baselines.keep_count(n, keep_ratio), len(visual.blocks))
    for block, r in zip(visual.blocks, schedule):
        size_log = sizes.log().repeat_interleave(unit**2)
        x_in, x = x, _proportional_block(block, x, visual.rotary_pos_emb(x, pos), size_log)
        if r:
            src, dst = baselines.bipartite_soft_matching(_units(_keys(block, x_in).mean(1), unit).mean(1), r)
            merged, sizes, idx = baselines.merge_into(_units(x, unit), sizes, src, dst)
            x, pos, kept = merged.flatten(0, 1), _units(pos, unit)[idx].flatten(0, 1), kept[idx.cpu()]
    return x, kept


QUERY_CHUNK = 1024
"""Queries per block when VisionZip sums attention probabilities: a long video never holds n x n."""


def _visionzip(visual, item: TokenGrid, cfg: BaselineConfig) -> tuple[Tensor, Tensor]:
    """VisionZip for one item on the tower's output. Qwen2-VL has no CLS token, so a group's saliency
    is the attention its patches receive in the last block, averaged over heads and all queries.
    Returns (features (n_kept * unit^2, C) before the projector, kept group indices)."""
    unit, depth = visual.spatial_merge_size, len(visual.blocks)
    x_last = _run_blocks(visual, item, range(depth - 1))
    last = visual.blocks[-1]
    q, k, _ = last.attn.qkv(last.norm1(x_last)).reshape(len(x_last), 3, last.attn.num_heads, -1).unbind(1)
    q, k = apply_rotary_pos_emb_vision(q, k, *visual.rotary_pos_emb(x_last, item.positions))
    received = x_last.new_zeros(len(x_last), dtype=torch.float32)
    for h in range(q.shape[1]):  # one head and QUERY_CHUNK queries at a time: memory linear in n
        for rows in q[:, h].split(QUERY_CHUNK):
            received += ((rows @ k[:, h].T).float() * last.attn.scaling).softmax(-1).sum(0) / len(q)
    x = _run_blocks(visual, TokenGrid(x_last, item.sizes, item.positions, item.grids), range(depth - 1, depth))
    n = len(x) // unit**2
    keep = baselines.keep_count(n, cfg.keep_ratio)
    dominant = round(cfg.dominant * keep)
    metric = _units(_keys(last, x_last).mean(1), unit).mean(1)
    merged, kept = baselines.visionzip_merge(_units(x, unit), _units(received, unit).sum(1), metric, dominant, keep - dominant)
    return merged.flatten(0, 1), kept.cpu()


def _pool(embeds: Tensor, grid: tuple[int, int, int], unit: int, keep_ratio: float) -> tuple[Tensor, tuple[int, int, int]]:
    """Average pooling of one item's LLM-token grid: one 2x step per halving of keep_ratio, axes
    alternating (w first). Returns (pooled tokens, pooled ViT grid)."""
    t, h, w = grid
    tokens = TokenGrid(embeds, embeds.new_ones(len(embeds)), embeds.new_zeros(len(embeds), 2), ((t, h // unit, w // unit),))
    for axis in step_axes(round(math.log2(1 / keep_ratio)), "w"):
        tokens = merge_step(tokens, axis, 1, "grid")
    (t, h, w), = tokens.grids
    return tokens.hidden, (t, h * unit, w * unit)


@torch.no_grad()
def encode(visual, pixel_values: Tensor, grid_thw: Tensor, compression: CompressionConfig | None = None,
           check: Callable[[], None] = lambda: None) -> VisualTokens:
    """Run the vision tower and its projector with the compression's vision-side part: OIM, or one of
    the tome / visionzip / pool / random baselines. check() runs before each block of the OIM path
    (it raises to stop a cancelled request).

    pixel_values: the image processor's flattened patches for all media items, in order;
    grid_thw: (n_items, 3) their patch grids.
    """
    unit = visual.spatial_merge_size
    method = compression.method if compression else "none"
    oim = compression.oim if compression else None
    hidden = visual.patch_embed(pixel_values.to(visual.device))
    tokens = TokenGrid(
        hidden=hidden,
        sizes=hidden.new_ones(len(hidden), dtype=torch.float32),
        positions=get_vision_position_ids(grid_thw, unit).float().to(hidden.device),
        grids=tuple(tuple(int(v) for v in g) for g in grid_thw.tolist()),
    )
    if method == "tome":  # per frame: a video's frames are separate attention segments
        embeds, cells = [], []
        for item in _split(tokens):
            t, h, w = item.grids[0]
            outs = [_tome(visual, frame, compression.baseline.keep_ratio) for frame in _split(_frames(item))]
            embeds += [visual.merger(x) for x, _ in outs]
            cells.append(torch.cat([f * grid_tokens((1, h, w), unit) + kept for f, (_, kept) in enumerate(outs)]))
        return VisualTokens(torch.cat(embeds), list(tokens.grids), cells)
    if method == "visionzip":
        outs = [_visionzip(visual, item, compression.baseline) for item in _split(tokens)]
        return VisualTokens(torch.cat([visual.merger(x) for x, _ in outs]), list(tokens.grids), [kept for _, kept in outs])
    depth = len(visual.blocks)
    layers = merge_layers(oim.merge_depths, depth) if oim else []
    start = 0
    for layer, axis in zip(layers, step_axes(len(layers), oim.first_axis) if oim else []):
        tokens = TokenGrid(_run_blocks(visual, tokens, range(start, layer), check), tokens.sizes, tokens.positions, tokens.grids)
        tokens = merge_step(tokens, axis, unit, oim.positions)
        start = layer
    embeds = visual.merger(_run_blocks(visual, tokens, range(start, depth), check))
    grids = list(tokens.grids)
    if method not in ("pool", "random"):
        return VisualTokens(embeds, grids)
    pieces, cells = [], []
    for i, (e, grid) in enumerate(zip(embeds.split([grid_tokens(g, unit) for g in grids]), tokens.grids)):
        if method == "pool":
            e, grids[i] = _pool(e, grid, unit, compression.baseline.keep_ratio)
            cells.append(None)
        else:
            kept = baselines.random_keep(len(e), baselines.keep_count(len(e), compression.baseline.keep_ratio), compression.baseline.seed + i)
            e = e[kept.to(e.device)]
            cells.append(kept)
        pieces.append(e)
    return VisualTokens(torch.cat(pieces), grids, cells)
