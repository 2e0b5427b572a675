"""What the engine knows about a VLM family, and the registry of families by HF `model_type`.

A family file (one per family, e.g. `qwen2_vl.py`) subclasses `Family`: the model classes, how a
checkpoint splits into its vision and language halves, the image processor and patchify, the chat
template and placeholder tokens, the LLM's position ids, and a tiny config for tests. A new family is
a module here and one line in MODULES; nothing outside the family files names a family's classes,
attribute paths or tokens.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Sequence

from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from luvc_common.compression.methods.base import VisionTower
from luvc_common.errors import ConfigError, ModelLoadError

MODULES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "internvl": "internvl"}
"""HF model_type -> family module in this package."""


@dataclass(frozen=True)
class ChatTokens:
    """The special tokens of a family's chat template and media placeholders."""

    pad: str
    turn_start: str
    turn_end: str
    """Ends a turn; the end-of-sequence token of an answer."""
    media_start: str
    media_end: str
    image: str
    """Repeated once per LLM token of an image."""
    video: str
    """Repeated once per LLM token of a video whose frames make one run (frame_prefix None)."""
    frame_prefix: str | None = None
    """InternVL-style video: each frame is its own image run (media_start, `image` tokens, media_end) after
    this prefix, formatted with the frame number from 1 ("Frame{i}: "), runs joined by newlines."""

    @property
    def all(self) -> list[str]:
        return [self.pad, self.turn_start, self.turn_end, self.media_start, self.media_end, self.image, self.video]

    def placeholder(self, kind: str) -> str:
        return self.video if kind == "video" and self.frame_prefix is None else self.image

    def runs(self, kind: str, frames: int) -> int:
        """Placeholder runs an item of this kind with `frames` grid frames makes in a prompt."""
        return frames if kind == "video" and self.frame_prefix is not None else 1


class MediaItem(Protocol):
    kind: str
    """"image" or "video"."""
    frames: list
    """PIL images (one for an image)."""


class Family:
    model_type: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]
    config_class: ClassVar[type]
    chat: ClassVar[ChatTokens]
    vision_modules: ClassVar[tuple[str, ...]]
    """Attributes of `model.model` that only the vision half needs."""
    block_outputs: ClassVar[tuple[str, ...]] = ()
    """Names (within a vision block) of the projections that write into the residual stream: zeroed, the block is
    the identity, which is how a trained tower grows deeper without changing what it computes."""
    layer_outputs: ClassVar[tuple[str, ...]] = ("self_attn.o_proj", "mlp.down_proj")
    """The same for an LLM decoder layer (transformers' Qwen2, Qwen3 and Llama layers alike)."""

    # checkpoints
    def tiny_config(self, tokenizer, **sizes: Any):
        """Config of a tiny random model for tests (sizes: text_layers, vision_depth, hidden, ...)."""
        raise NotImplementedError

    def random_model(self, config) -> nn.Module:
        """A model of `config` with random weights (the caller seeds torch)."""
        return self.model_class(config)

    def image_processor(self, min_pixels: int, max_pixels: int):
        """The family's image processor (a transformers class) for a tiny checkpoint."""
        raise NotImplementedError

    def tiny_image_processor(self, config, max_pixels: int):
        """The image processor saved with a tiny checkpoint of `config`."""
        return self.image_processor(112 * 112, max_pixels)

    def canonical_key(self, key: str) -> str:
        """A weight name of an older checkpoint layout -> the name in the current model class."""
        return key

    # model halves
    def vision(self, model: nn.Module) -> nn.Module:
        """The vision tower with its projector."""
        raise NotImplementedError

    def language(self, model: nn.Module) -> nn.Module:
        """The decoder stack (embed_tokens, layers, norm, rotary_emb): transformers' `model.language_model`."""
        return model.model.language_model

    def drop(self, model: nn.Module, part: str) -> None:
        """Remove the modules a `part` ("vision" or "language") does not need, before weights load."""
        if part == "vision":
            model.model.language_model = None
            model.lm_head = None
        else:
            for name in self.vision_modules:
                setattr(model.model, name, None)

    def tower(self, visual: nn.Module) -> VisionTower:
        raise NotImplementedError

    def projector(self, visual: nn.Module) -> nn.Module:
        """The module whose output is the visual tokens the LLM receives."""
        raise NotImplementedError

    def embed_dim(self, visual: nn.Module) -> int:
        """Width of the projector's output: the LLM hidden size."""
        raise NotImplementedError

    def unit(self, config) -> int:
        """Side of the projector's patch group: one LLM token per unit x unit patches."""
        raise NotImplementedError

    # media
    def planned_size(self, processor, width: int, height: int, kind: str = "image") -> tuple[int, int]:
        """(width, height) the image processor resizes an image (or a video's frame) of this size to."""
        raise NotImplementedError

    def vit_patches(self, processor, kind: str, width: int, height: int, frames: int) -> int:
        """ViT patches an item of this kind, size and frame count becomes, from its header alone."""
        raise NotImplementedError

    def patchify(self, media: Sequence[MediaItem], processor) -> tuple[Tensor, Tensor]:
        """Flattened patches and (t, h, w) patch grids of all items, in order, as the tower wants."""
        raise NotImplementedError

    # language side
    def media_token_types(self, config) -> dict[int, int]:
        """Placeholder token id -> media type id (1 image, 2 video)."""
        raise NotImplementedError

    def position_ids(self, model: nn.Module, ids: Tensor, token_type: Tensor, image_grids: list, video_grids: list,
                     valid: Tensor) -> Tensor:
        """Position ids of a left-padded prompt batch (`valid`: real tokens), in the shape the LLM's
        rotary embedding takes: (B, L) for 1D RoPE, (axes, B, L) for multi-axis RoPE (Qwen's M-RoPE)."""
        raise NotImplementedError

    def decode_position_ids(self, next_position: Tensor) -> Tensor:
        """Position ids of one new token per row, from (B,) next positions."""
        raise NotImplementedError

    def source_positions(self, positions: Tensor, items: list[list[tuple[Tensor, tuple, tuple]]]) -> Tensor:
        """position_ids of merged media moved to where their source grids put them (oim.llm_positions "source").
        items: per row, per media item in prompt order, (its cells in the row, its LLM-token grid, its source
        LLM-token grid)."""
        raise ConfigError(f'oim.llm_positions="source" is not supported for {self.model_type} models')

    def last_query_attention(self, layer: nn.Module, layer_in: Tensor, cos: Tensor, sin: Tensor, keys: Tensor,
                             valid: Tensor) -> Tensor:
        """(B, heads, keys) attention weights of the last query in `layer`, from the layer's input and its
        cached (rotated) keys: what eager attention would return for that row. This default reads a
        transformers decoder layer (input_layernorm; self_attn with q_proj, an optional q_norm, and
        rotate-half rotary on the layer's cos/sin)."""
        attn = layer.self_attn
        x = layer.input_layernorm(layer_in[:, -1:])
        q = attn.q_proj(x).view(len(x), 1, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3-style query norm
            q = attn.q_norm(q)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)
        logits = (q @ keys.transpose(-1, -2))[:, :, 0].float() * attn.scaling
        return logits.masked_fill(~valid[:, None, :].to(logits.device), float("-inf")).softmax(-1)


def get_family(model_type: str) -> Family:
    if model_type not in MODULES:
        raise ModelLoadError(f"unsupported model family {model_type!r}: expected one of {list(MODULES)}")
    return importlib.import_module(f"{__package__}.{MODULES[model_type]}").FAMILY


def family_of(config) -> Family:
    return get_family(config.model_type)
