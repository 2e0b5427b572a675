"""Qwen2.5-VL: Qwen2-VL with window attention in the vision tower (full attention in `fullatt_block_indexes`)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_window_index

from luvc_common.compression.oim import TokenGrid
from luvc_common.models.qwen2_vl import Qwen2VL, QwenVisionTower


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


class Qwen25VL(Qwen2VL):
    model_type = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    config_class = Qwen2_5_VLConfig
    tower_class = Qwen25VisionTower
    block_outputs = ("attn.proj", "mlp.down_proj")

    @staticmethod
    def _vision_sizes(vision_dim: int, hidden: int, depth: int) -> dict:
        return dict(hidden_size=vision_dim, out_hidden_size=hidden, intermediate_size=2 * vision_dim, window_size=56,
                    fullatt_block_indexes=[depth - 1])


FAMILY = Qwen25VL()
