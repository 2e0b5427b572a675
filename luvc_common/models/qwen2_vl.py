"""Qwen2-VL: the family adapter (models/family.py) and its vision tower as the compression methods see it.

The tower's own modules (patch_embed, rotary_pos_emb, blocks, merger) do all the work; `run_blocks`
only re-derives the attention segments and rotary angles from the current grids, so it stays correct
after a merge step. With no compression it computes exactly the stock forward.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

from luvc_common.compression.oim import TokenGrid
from luvc_common.models.family import ChatTokens, Family, MediaItem

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


class Qwen2VL(Family):
    model_type = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    config_class = Qwen2VLConfig
    tower_class = QwenVisionTower
    vision_modules = ("visual",)
    block_outputs = ("attn.proj", "mlp.fc2")
    chat = ChatTokens(pad="<|endoftext|>", turn_start="<|im_start|>", turn_end="<|im_end|>", media_start="<|vision_start|>",
                      media_end="<|vision_end|>", image="<|image_pad|>", video="<|video_pad|>")

    def tiny_config(self, tokenizer, text_layers: int = 4, vision_depth: int = 4, hidden: int = 256, vision_dim: int = 128,
                    init_range: float = 0.1, rope_theta: float = 10000.0, mrope_section: tuple[int, int, int] = (8, 12, 12),
                    text_overrides: dict | None = None, vision_overrides: dict | None = None):
        """A ~4M-parameter model (defaults): vision vision_dim x vision_depth (heads of 32 channels, at least 4),
        LLM hidden x text_layers; rope_theta and mrope_section (temporal, height, width rotary frequencies, summing
        to head_dim / 2) set the LLM's M-RoPE; the overrides replace text / vision config fields (e.g. a real model's shape)."""
        ids = tokenizer.convert_tokens_to_ids
        special = dict(bos_token_id=ids(self.chat.pad), eos_token_id=ids(self.chat.turn_end), pad_token_id=ids(self.chat.pad))
        text = dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=init_range,
            rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta), "mrope_section": list(mrope_section)},
            **special,
        )
        vision = dict(depth=vision_depth, num_heads=max(4, vision_dim // 32), initializer_range=init_range, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, **self._vision_sizes(vision_dim, hidden, vision_depth))
        return self.config_class(
            text_config={**text, **(text_overrides or {})}, vision_config={**vision, **(vision_overrides or {})},
            tie_word_embeddings=True, image_token_id=ids(self.chat.image), video_token_id=ids(self.chat.video),
            vision_start_token_id=ids(self.chat.media_start), vision_end_token_id=ids(self.chat.media_end), **special,
        )

    @staticmethod
    def _vision_sizes(vision_dim: int, hidden: int, depth: int) -> dict:
        return dict(embed_dim=vision_dim, hidden_size=hidden, mlp_ratio=2)

    def image_processor(self, min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
        return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)

    def canonical_key(self, key: str) -> str:
        """Pre-transformers-5 names (visual.*, model.layers.*) -> the current layout."""
        if key.startswith("visual."):
            return "model." + key
        if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
            return "model.language_model." + key[len("model.") :]
        return key

    def vision(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def tower(self, visual: nn.Module) -> QwenVisionTower:
        return self.tower_class(visual)

    def projector(self, visual: nn.Module) -> nn.Module:
        return visual.merger

    def embed_dim(self, visual: nn.Module) -> int:
        return visual.merger.mlp[-1].out_features

    def unit(self, config) -> int:
        return config.vision_config.spatial_merge_size

    def planned_size(self, processor, width: int, height: int, kind: str = "image") -> tuple[int, int]:
        h, w = smart_resize(height, width, factor=processor.patch_size * processor.merge_size,
                            min_pixels=processor.size["shortest_edge"], max_pixels=processor.size["longest_edge"])
        return w, h

    def vit_patches(self, processor, kind: str, width: int, height: int, frames: int) -> int:
        w, h = self.planned_size(processor, width, height)
        steps = -(-frames // processor.temporal_patch_size) if kind == "video" else 1
        return steps * (w // processor.patch_size) * (h // processor.patch_size)

    def patchify(self, media: Sequence[MediaItem], image_processor) -> tuple[Tensor, Tensor]:
        """Images go through the image processor unchanged. A video's frames are each processed as an
        image (which repeats the frame over the temporal patch) and consecutive frames are then
        interleaved into temporal patches; an odd last group repeats the last frame, as Qwen-VL does."""
        tp = image_processor.temporal_patch_size
        pixels, grids = [], []
        for item in media:
            processed = [image_processor(images=f, return_tensors="pt") for f in item.frames]
            if item.kind == "image":
                pixels.append(processed[0]["pixel_values"])
                grids.append(processed[0]["image_grid_thw"][0])
                continue
            per_frame = [p["pixel_values"].view(len(p["pixel_values"]), 3, tp, -1)[:, :, 0] for p in processed]
            per_frame += per_frame[-1:] * (-len(per_frame) % tp)
            groups = [torch.stack(per_frame[i : i + tp], dim=2).flatten(1) for i in range(0, len(per_frame), tp)]
            pixels.append(torch.cat(groups))
            _, h, w = processed[0]["image_grid_thw"][0].tolist()
            grids.append(torch.tensor([len(groups), h, w]))
        return torch.cat(pixels), torch.stack(grids)

    def media_token_types(self, config) -> dict[int, int]:
        return {config.image_token_id: 1, config.video_token_id: 2}

    def position_ids(self, model: nn.Module, ids: Tensor, token_type: Tensor, image_grids: list, video_grids: list,
                     valid: Tensor) -> Tensor:
        """M-RoPE: (temporal, height, width) positions; media tokens take their grid cell's."""
        position_ids, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=token_type, image_grid_thw=torch.tensor(image_grids) if image_grids else None,
            video_grid_thw=torch.tensor(video_grids) if video_grids else None, attention_mask=valid.long(),
        )
        return position_ids

    def decode_position_ids(self, next_position: Tensor) -> Tensor:
        """After the prompt, all three M-RoPE axes advance together."""
        return next_position.view(1, -1, 1).expand(3, -1, 1)

    def source_positions(self, positions: Tensor, items: list[list[tuple[Tensor, tuple, tuple]]]) -> Tensor:
        """M-RoPE puts cell (r, c) of an item starting at s at heights s + r and widths s + c, and the text after it
        at s + max(t, h, w). Stretch the rows and columns to the source grid (a merged cell at the mean of the
        source cells it covers) and move everything after the item by the difference of those extents."""
        out = positions.to(torch.float32, copy=True)
        for b, row in enumerate(items):
            for cells, (t, h, w), (_, src_h, src_w) in row:
                pos = out[:, b, cells]
                start = pos[1, 0]
                frames = int(pos[0].max() - start) + 1
                for axis, n, src in ((1, h, src_h), (2, w, src_w)):
                    pos[axis] = start + (pos[axis] - start + 0.5) * src / n - 0.5
                out[:, b, cells] = pos
                out[:, b, int(cells[-1]) + 1 :] += max(frames, src_h, src_w) - max(frames, h, w)
        return out


FAMILY = Qwen2VL()
