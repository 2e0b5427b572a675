"""Tiny checkpoints with deterministic random weights, for tests and as a placeholder model, and the one
writer of checkpoint directories (random, benchmark-shaped or trained).

They are standard HF checkpoint directories (config, safetensors, tokenizer, preprocessor config)
built from transformers' own config and model classes; only the sizes are small.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import GenerationConfig

from luvc_common.models.family import get_family
from luvc_common.models.tokenizer import build_tokenizer


def save_model(model, tokenizer, image_processor, out: str | Path) -> Path:
    """A standard HF directory: config (dtype bfloat16), bf16 safetensors, greedy generation config
    ending at the tokenizer's EOS, tokenizer and image processor."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out, state_dict={k: v.to("cpu", torch.bfloat16) for k, v in model.state_dict().items()})
    umask = os.umask(0)
    os.umask(umask)
    for weights in out.glob("*.safetensors"):  # safetensors writes 0600: a service running as another user (the
        weights.chmod(0o666 & ~umask)          # Docker image's) could not read a mounted export
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def save_random_checkpoint(out_dir: str | Path, family: str = "qwen2_vl", seed: int = 0, max_pixels: int = 672 * 672,
                           **sizes) -> Path:
    """Write a deterministic random-init tiny checkpoint of `family` (a model_type) to out_dir; `sizes`
    go to the family's tiny_config."""
    fam = get_family(family)
    tokenizer = build_tokenizer(fam.chat)
    config = fam.tiny_config(tokenizer, **sizes)
    torch.manual_seed(seed)
    return save_model(fam.random_model(config), tokenizer, fam.tiny_image_processor(config, max_pixels), out_dir)
