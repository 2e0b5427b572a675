"""Tiny Qwen-VL checkpoints with deterministic random weights, for tests and as a placeholder model.

They are standard HF checkpoint directories (config, safetensors, tokenizer, preprocessor config)
built from transformers' own config and model classes; only the sizes are small.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from luvc_common.models.tokenizer import IMAGE_PAD, IM_END, PAD, VIDEO_PAD, VISION_END, VISION_START, build_tokenizer

FAMILIES = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration), "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}


def tiny_config(family: str, tokenizer, text_layers: int = 4, vision_depth: int = 4, hidden: int = 256,
                vision_dim: int = 128, init_range: float = 0.1, rope_theta: float = 10000.0,
                mrope_section: tuple[int, int, int] = (8, 12, 12), text_overrides: dict | None = None,
                vision_overrides: dict | None = None):
    """Config of a ~4M-parameter model (defaults): vision vision_dim x vision_depth, LLM hidden x text_layers;
    rope_theta and mrope_section (temporal, height, width rotary frequencies, summing to head_dim / 2) set the
    LLM's M-RoPE; the overrides replace text / vision config fields (e.g. a real model's shape)."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=init_range,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta), "mrope_section": list(mrope_section)},
        bos_token_id=ids(PAD), eos_token_id=ids(IM_END), pad_token_id=ids(PAD),
    )
    vision = dict(depth=vision_depth, num_heads=4, initializer_range=init_range, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        vision.update(embed_dim=vision_dim, hidden_size=hidden, mlp_ratio=2)
    else:
        vision.update(hidden_size=vision_dim, out_hidden_size=hidden, intermediate_size=2 * vision_dim, window_size=56,
                      fullatt_block_indexes=[vision_depth - 1])
    config_cls, _ = FAMILIES[family]
    return config_cls(
        text_config={**text, **(text_overrides or {})}, vision_config={**vision, **(vision_overrides or {})}, tie_word_embeddings=True,
        image_token_id=ids(IMAGE_PAD), video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START), vision_end_token_id=ids(VISION_END),
        bos_token_id=ids(PAD), eos_token_id=ids(IM_END), pad_token_id=ids(PAD),
    )


def save_random_checkpoint(out_dir: str | Path, family: str = "qwen2_vl", seed: int = 0, **sizes) -> Path:
    """Write a deterministic random-init tiny checkpoint of `family` to out_dir (bf16 safetensors)."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(family, tokenizer, **sizes)
    torch.manual_seed(seed)
    model = FAMILIES[family][1](config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=112 * 112, max_pixels=672 * 672).save_pretrained(out)
    return out
