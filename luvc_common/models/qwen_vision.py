"""Qwen2-VL / Qwen2.5-VL vision tower as the compression methods see it (`methods.base.VisionTower`).

The tower's own modules (patch_embed, rotary_pos_emb, blocks, merger) do all the work; `run_blocks`
only re-derives the attention segments, rotary angles and (Qwen2.5-VL) windows from the current grids,
so it stays correct after a merge step. With no compression it computes exactly the stock forward.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from luvc_common.compression.config import CompressionConfig
from luvc_common.compression.methods import get
from luvc_common.compression.oim import TokenGrid
from luvc_common.compression.visual import VisualTokens

QUERY_CHUNK = 1024
"""Queries per step when summing attention probabilities: a long video never holds n x n."""


class QwenVisionTower:
    """Qwen2-VL's tower: every block attends over whole frames."""

    full_attention = True

    def __init__(self, visual):
        self.visual = visual
        self.unit = visual.spatial_merge_size
        self.depth = len(visual.blocks)

    def embed(self, pixel_values: Tensor, grid_thw: Tensor) -> TokenGrid:
        """Patch embeddings of the image processor's flattened patches, on their (t, h, w) grids."""
        hidden = self.visual.patch_embed(pixel_values.to(self.visual.device))
        return TokenGrid(
            hidden=hidden,
            sizes=hidden.new_ones(len(hidden), dtype=torch.float32),
            positions=get_vision_position_ids(grid_thw, self.unit).float().to(hidden.device),
            grids=tuple(tuple(int(v) for v in g) for g in grid_thw.tolist()),
        )

    def run_blocks(self, tokens: TokenGrid, blocks: range, check: Callable[[], None] = lambda: None) -> Tensor:
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(self._grid_thw(tokens), self.visual.config)
        cos, sin = self.visual.rotary_pos_emb(tokens.hidden, tokens.positions)
        x = tokens.hidden
        for i in blocks:
            check()
            x = self.visual.blocks[i](x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=(cos, sin))
        return x

    def project(self, x: Tensor) -> Tensor:
        return self.visual.merger(x)

    def keys(self, block: int, x: Tensor) -> Tensor:
        attn = self.visual.blocks[block].attn
        return attn.qkv(self.visual.blocks[block].norm1(x)).reshape(len(x), 3, attn.num_heads, -1)[:, 1]

    def proportional_block(self, block: int, x: Tensor, positions: Tensor, size_log: Tensor) -> Tensor:
        """The block's own modules with ToMe's proportional attention; the bias travels with the call."""
        blk = self.visual.blocks[block]
        attn = blk.attn
        q, k, v = attn.qkv(blk.norm1(x)).reshape(len(x), 3, attn.num_heads, -1).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, *self.visual.rotary_pos_emb(x, positions))
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                             attn_mask=size_log.to(q.dtype)[None, None, None, :], scale=attn.scaling)
        x = x + attn.proj(out[0].transpose(0, 1).reshape(len(x), -1))
        return x + blk.mlp(blk.norm2(x))

    def attention_received(self, block: int, x: Tensor, positions: Tensor) -> Tensor:
        blk = self.visual.blocks[block]
        q, k, _ = blk.attn.qkv(blk.norm1(x)).reshape(len(x), 3, blk.attn.num_heads, -1).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, *self.visual.rotary_pos_emb(x, positions))
        received = x.new_zeros(len(x), dtype=torch.float32)
        for h in range(q.shape[1]):  # one head and QUERY_CHUNK queries at a time: memory linear in n
            for rows in q[:, h].split(QUERY_CHUNK):
                received += ((rows @ k[:, h].T).float() * blk.attn.scaling).softmax(-1).sum(0) / len(q)
        return received

    @staticmethod
    def _grid_thw(tokens: TokenGrid) -> Tensor:
        return torch.tensor(tokens.grids, device=tokens.hidden.device)


class Qwen25VisionTower(QwenVisionTower):
    """Qwen2.5-VL's tower: window attention except in `fullatt_block_indexes`."""

    full_attention = False

    def run_blocks(self, tokens: TokenGrid, blocks: range, check: Callable[[], None] = lambda: None) -> Tensor:
        v, unit = self.visual, self.unit
        grid_thw = self._grid_thw(tokens)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, v.config)
        window_index, cu_window = get_vision_window_index(grid_thw, unit, v.window_size, v.patch_size)
        max_window = get_max_seqlen(cu_window, v.config)
        cos, sin = v.rotary_pos_emb(tokens.hidden, tokens.positions)
        x, cos, sin = (v.permute_input_for_window_attn(t, window_index, len(tokens.hidden)) for t in (tokens.hidden, cos, sin))
        for i in blocks:
            check()
            full = i in v.fullatt_block_indexes
            x = v.blocks[i](x, cu_seqlens=cu_seqlens if full else cu_window, max_seqlen=max_seqlen if full else max_window,
                            position_embeddings=(cos, sin))
        return x.reshape(-1, unit * unit, x.shape[-1])[torch.argsort(window_index)].reshape(len(x), -1)


TOWERS = {"qwen2_vl_vision": QwenVisionTower, "qwen2_5_vl_vision": Qwen25VisionTower}


@torch.no_grad()
def encode(visual, pixel_values: Tensor, grid_thw: Tensor, compression: CompressionConfig | None = None,
           check: Callable[[], None] = lambda: None) -> VisualTokens:
    """The vision tower and its projector with the compression method's encoder part; check() runs
    between blocks (it raises to stop a cancelled request).

    pixel_values: the image processor's flattened patches for all media items, in order;
    grid_thw: (n_items, 3) their patch grids.
    """
    tower = TOWERS[visual.config.model_type](visual)
    method = get(compression.method if compression else "none")
    return method.encode(tower, tower.embed(pixel_values, grid_thw), compression or method.config(), check)
