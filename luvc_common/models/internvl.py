"""InternVL (InternVL2.5 / 3 / 3.5 in transformers' native `InternVLForConditionalGeneration` format): the
family adapter (models/family.py) and its vision tower as the compression methods see it.

An image is cut by `GotOcr2ImageProcessorPil` (crop_to_patches=True) into square tiles plus a
thumbnail; every tile goes through InternViT on its own (a CLS token, learned absolute position
embeddings, no rotary, no windows). Here the tiles of one image are the frames of one (tiles, h, w)
patch grid, so OIM's merge steps act on every tile's patch grid at once and all tiles of a request
share one merged grid. The pixel-shuffle projector turns each unit x unit patch group into one LLM
token; on block-major tokens that is a plain reshape, so it works on a merged (non-square) grid,
which `get_image_features`' square reshape cannot. The LLM (Qwen2, Qwen3 or Llama) uses plain 1D
RoPE, so kept tokens keep their original position ids after pruning.

A video is one tile per frame (each frame resized to the tile, as InternVL's video processor does),
and in the prompt each frame is its own `Frame{i}: <img>...</img>` run; its frames are the frames of
one (frames, h, w) grid, like an image's tiles.

SPU sees an item as its (tiles or frames, h, w) LLM-token grid, so its low-pass filter runs on each
tile (the thumbnail included) or frame as its own 2D signal; the tile mosaic is not stitched back into
one grid.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import InternVLConfig, InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil, get_optimal_tiled_canvas

from luvc_common.compression.oim import TokenGrid, grid_positions, raster_to_block_major
from luvc_common.errors import MediaError, ModelLoadError
from luvc_common.models.family import ChatTokens, Family, MediaItem

MAX_TILES = 12
"""InternVL's own limit on tiles per image (the thumbnail comes on top)."""
PATCH = 14
"""InternViT's patch side, in every released InternVL (the image processor does not know it)."""


class InternVisionTower:
    """InternViT as the compression methods see it.

    Tokens are kept in block-major order per tile: InternViT's blocks are permutation-equivariant
    within a tile (positions enter once, as absolute embeddings), so the order does not change their
    output. Each tile's CLS token attends with its tile in every block but is never merged: it travels
    as `width` extra channels of every token of its tile, which a merge step (a size-weighted mean of
    tokens of one tile) leaves unchanged, so run_tower and the methods carry it without knowing it.
    """

    full_attention = True

    def __init__(self, model: nn.Module):
        self.vit = model.vision_tower
        self.projector = model.multi_modal_projector
        self.unit = round(1 / model.config.downsample_ratio)
        self.depth = len(self.vit.encoder.layer)
        self.width = model.config.vision_config.hidden_size
        if model.config.vision_feature_layer != -1 or model.config.vision_feature_select_strategy != "default":
            raise ModelLoadError("InternVL: only vision_feature_layer=-1 with the 'default' (CLS dropped) strategy is supported")

    def embed(self, pixel_values: Tensor, grid_thw: Tensor) -> TokenGrid:
        """Patch embeddings (with position embeddings) of (tiles, 3, H, W) tiles on their (tiles, h, w) grids."""
        weight = self.vit.embeddings.patch_embeddings.projection.weight
        emb = self.vit.embeddings(pixel_values.to(weight.device, weight.dtype))
        grids = tuple(tuple(int(v) for v in g) for g in grid_thw.tolist())
        _, h, w = grids[0]
        patches = raster_to_block_major(emb[:, 1:].reshape(len(emb), h, w, -1), self.unit)
        hidden = torch.cat([patches, emb[:, 0].repeat_interleave(h * w, dim=0)], dim=-1)
        return TokenGrid(
            hidden=hidden,
            sizes=hidden.new_ones(len(hidden), dtype=torch.float32),
            positions=torch.cat([grid_positions(g, self.unit) for g in grids]).to(hidden.device),
            grids=grids,
        )

    def run_blocks(self, tokens: TokenGrid, blocks: range, check: Callable[[], None] = lambda: None) -> Tensor:
        """Every tile (frame) is its own attention segment, its CLS token first."""
        tiles = self._tiles(tokens.hidden, self._tile_length(tokens.grids))
        for i in blocks:
            check()
            tiles = self.vit.encoder.layer[i](tiles)
        return self._tokens(tiles)

    def project(self, x: Tensor) -> Tensor:
        """The vision tower's final norm, then pixel shuffle (unit x unit block-major patches -> one
        token of unit^2 x width channels) and the projector."""
        patches = self.vit.layernorm(x[:, : self.width])
        return self.projector(patches.reshape(-1, self.unit**2 * self.width))

    def keys(self, block: int, x: Tensor) -> Tensor:
        attn = self.vit.encoder.layer[block].attention
        k = attn.k_norm(attn.k_proj(self.vit.encoder.layer[block].layernorm_before(x[:, : self.width])))
        return k.reshape(len(x), attn.num_heads, attn.head_dim)

    def proportional_block(self, block: int, x: Tensor, positions: Tensor, size_log: Tensor) -> Tensor:
        """The block on one tile with ToMe's proportional attention (the CLS token has size 1)."""
        layer = self.vit.encoder.layer[block]
        attn = layer.attention
        seq = self._tiles(x, len(x))[0]
        q, k, v = (self._heads(attn, norm(proj(layer.layernorm_before(seq))))
                   for proj, norm in ((attn.q_proj, attn.q_norm), (attn.k_proj, attn.k_norm), (attn.v_proj, nn.Identity())))
        bias = torch.cat([size_log.new_zeros(1), size_log]).to(q.dtype)[None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        seq = seq + layer.lambda_1 * attn.projection_layer(out.transpose(0, 1).reshape(len(seq), -1))
        seq = seq + layer.lambda_2 * layer.mlp(layer.layernorm_after(seq))
        return self._tokens(seq[None])

    def attention_received(self, block: int, x: Tensor, positions: Tensor) -> Tensor:
        """Attention each patch token receives within its tile from every query of the tile (CLS
        included), averaged over heads and queries. x holds the equal tiles of one image; a tile
        starts where the (h, w) positions restart at (0, 0)."""
        layer = self.vit.encoder.layer[block]
        attn = layer.attention
        tiles = int((positions == 0).all(-1).sum())
        seq = layer.layernorm_before(self._tiles(x, len(x) // tiles))
        q = attn.q_norm(attn.q_proj(seq)).view(tiles, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(seq)).view(tiles, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = ((q @ k.transpose(-1, -2)).float() * attn.scale).softmax(-1)
        return probs.mean(dim=(1, 2))[:, 1:].reshape(-1)

    @staticmethod
    def _heads(attn: nn.Module, x: Tensor) -> Tensor:
        """(L, heads * head_dim) -> (heads, L, head_dim)."""
        return x.view(len(x), attn.num_heads, attn.head_dim).transpose(0, 1)

    @staticmethod
    def _tile_length(grids) -> int:
        """Tokens per tile; all tiles share one patch grid (one tile size, the same merge steps)."""
        lengths = {h * w for _, h, w in grids}
        if len(lengths) != 1:
            raise MediaError(f"InternVL tiles must share one patch grid, got grids {list(grids)}")
        return lengths.pop()

    def _tiles(self, hidden: Tensor, length: int) -> Tensor:
        """(N, 2 * width) tokens with their CLS channels -> (tiles, 1 + length, width), CLS first."""
        x = hidden.view(-1, length, 2 * self.width)
        return torch.cat([x[:, :1, self.width :], x[:, :, : self.width]], dim=1)

    def _tokens(self, tiles: Tensor) -> Tensor:
        """Inverse of _tiles."""
        patches, cls = tiles[:, 1:], tiles[:, :1].expand(-1, tiles.shape[1] - 1, -1)
        return torch.cat([patches, cls], dim=-1).reshape(-1, 2 * self.width)


class InternVL(Family):
    model_type = "internvl"
    model_class = InternVLForConditionalGeneration
    config_class = InternVLConfig
    chat = ChatTokens(pad="<|endoftext|>", turn_start="<|im_start|>", turn_end="<|im_end|>", media_start="<img>",
                      media_end="</img>", image="<IMG_CONTEXT>", video="<video>", frame_prefix="Frame{i}: ")
    vision_modules = ("vision_tower", "multi_modal_projector")

    def tiny_config(self, tokenizer, text_layers: int = 4, vision_depth: int = 4, hidden: int = 256, vision_dim: int = 64,
                    tile: int = 112, text_model_type: str = "qwen2", init_range: float = 0.1, rope_theta: float = 10000.0,
                    text_overrides: dict | None = None, vision_overrides: dict | None = None) -> InternVLConfig:
        """A ~3M-parameter model (defaults): InternViT vision_dim x vision_depth on tile x tile tiles of
        PATCH-pixel patches, a `text_model_type` LLM (qwen2, qwen3 or llama) of hidden x text_layers; the
        overrides replace text / vision config fields (e.g. a real model's shape)."""
        ids = tokenizer.convert_tokens_to_ids
        special = dict(bos_token_id=ids(self.chat.pad), eos_token_id=ids(self.chat.turn_end), pad_token_id=ids(self.chat.pad))
        text = dict(
            model_type=text_model_type, vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            initializer_range=init_range, rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
            tie_word_embeddings=True, **special,
        )
        vision = dict(hidden_size=vision_dim, num_hidden_layers=vision_depth, num_attention_heads=4,
                      intermediate_size=2 * vision_dim, image_size=tile, patch_size=PATCH, initializer_range=init_range)
        vision = {**vision, **(vision_overrides or {})}
        patches = vision["image_size"] // vision["patch_size"]
        return self.config_class(
            text_config={**text, **(text_overrides or {})}, vision_config=vision, image_token_id=ids(self.chat.image),
            image_seq_length=patches**2 // 4, downsample_ratio=0.5, tie_word_embeddings=True,
        )

    def random_model(self, config) -> nn.Module:
        """InternViT initialises its CLS token and position embeddings to zero; random ones make a
        tiny model's tower depend on where each patch is."""
        model = self.model_class(config)
        embeddings = model.model.vision_tower.embeddings
        with torch.no_grad():
            for p in (embeddings.cls_token, embeddings.position_embeddings):
                p.normal_(std=config.vision_config.initializer_range)
        return model

    def image_processor(self, min_pixels: int, max_pixels: int) -> GotOcr2ImageProcessorPil:
        """Square tiles of min_pixels each, as many as max_pixels covers (up to MAX_TILES), plus a thumbnail."""
        tile = math.isqrt(min_pixels)
        return GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                        max_patches=max(1, min(MAX_TILES, max_pixels // min_pixels)))

    def tiny_image_processor(self, config, max_pixels: int) -> GotOcr2ImageProcessorPil:
        tile = config.vision_config.image_size[0]
        return self.image_processor(tile * tile, max_pixels)

    def canonical_key(self, key: str) -> str:
        """transformers-4 names of the -hf checkpoints (language_model.model.*, vision_tower.*, ...) -> the current layout."""
        for old, new in (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                         ("language_model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    def vision(self, model: nn.Module) -> nn.Module:
        """The InternVLModel: its vision_tower and multi_modal_projector (the language model is None in a vision half)."""
        return model.model

    def tower(self, visual: nn.Module) -> InternVisionTower:
        return InternVisionTower(visual)

    def projector(self, visual: nn.Module) -> nn.Module:
        return visual.multi_modal_projector

    def embed_dim(self, visual: nn.Module) -> int:
        return visual.multi_modal_projector.linear_2.out_features

    def unit(self, config) -> int:
        return round(1 / config.downsample_ratio)

    def planned_size(self, processor, width: int, height: int, kind: str = "image") -> tuple[int, int]:
        """The tiled canvas: the processor cuts an image of exactly this size into the same tiles; a
        video frame: one tile."""
        tile = processor.size["height"]
        if kind == "video":
            return tile, tile
        columns, rows = get_optimal_tiled_canvas((height, width), (tile, tile), processor.min_patches, processor.max_patches)
        return columns * tile, rows * tile

    def vit_patches(self, processor, kind: str, width: int, height: int, frames: int) -> int:
        """Every tile of the canvas, plus the thumbnail the processor adds when there are several; a
        video: one tile per frame."""
        tile = processor.size["height"]
        if kind == "video":
            return frames * (tile // PATCH) ** 2
        columns, rows = (side // tile for side in self.planned_size(processor, width, height))
        return (columns * rows + (columns * rows > 1)) * (tile // PATCH) ** 2

    def patchify(self, media: Sequence[MediaItem], image_processor) -> tuple[Tensor, Tensor]:
        """(tiles, 3, tile, tile) pixels of all images' tiles (each image's thumbnail last) and videos'
        frames, and a (tiles or frames, tile / patch, tile / patch) grid per item. An image is first
        resized to its tiled canvas (a frame to the tile), as the encoder service decodes it, so the
        thumbnail is the same in and out of process."""
        pixels, grids = [], []
        for item in media:
            canvas = self.planned_size(image_processor, *item.frames[0].size, item.kind)
            frames = [f if f.size == canvas else f.resize(canvas, Image.Resampling.BICUBIC) for f in item.frames]
            tiles = image_processor(images=frames, crop_to_patches=item.kind == "image", return_tensors="pt")["pixel_values"]
            pixels.append(tiles)
            side = tiles.shape[-1] // PATCH
            grids.append(torch.tensor([len(tiles), side, side]))
        return torch.cat(pixels), torch.stack(grids)

    def media_token_types(self, config) -> dict[int, int]:
        return {config.image_token_id: 1}

    def position_ids(self, model: nn.Module, ids: Tensor, token_type: Tensor, image_grids: list, video_grids: list,
                     valid: Tensor) -> Tensor:
        """Plain 1D positions (B, L): real tokens count up from 0 after the left padding."""
        return (valid.long().cumsum(-1) - 1).clamp_min(0)

    def decode_position_ids(self, next_position: Tensor) -> Tensor:
        return next_position.view(-1, 1)


FAMILY = InternVL()
