"""Load Qwen-VL checkpoints from a local HF directory, whole or as one half.

The encoder service needs the vision tower with its projector and no LLM weights; the LLM service
needs the language model and no vision weights. Each half is transformers' own model class built
on the meta device with the other half removed, then filled with just its tensors from the
safetensors files, so neither service reads or holds the other's weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from transformers.utils import is_flash_attn_2_available

from luvc_common.config import DEFAULT_MODEL
from luvc_common.errors import ModelLoadError

MODEL_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
PARTS = ("full", "vision", "language")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Where a model comes from and how it runs."""

    path: str = str(DEFAULT_MODEL)
    """Local HF checkpoint directory (config.json, *.safetensors, tokenizer, preprocessor config)."""
    dtype: str = "auto"
    """Compute dtype: float32, bfloat16, float16, or auto (bfloat16 on GPU, float32 on CPU)."""
    device: str = "auto"
    """torch device, or auto (cuda when available, else cpu)."""
    attn_implementation: str = "auto"
    """transformers attention implementation; auto = flash_attention_2 when installed, else sdpa."""

    def resolved(self) -> tuple[torch.device, torch.dtype, str]:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else torch.device(self.device)
        if self.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif self.dtype in DTYPES:
            dtype = DTYPES[self.dtype]
        else:
            raise ModelLoadError(f"dtype={self.dtype!r} is invalid: expected auto or one of {list(DTYPES)}")
        attn = self.attn_implementation
        if attn == "auto":
            attn = "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"
        return device, dtype, attn


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    return files


def _canonical_key(key: str) -> str:
    """Map pre-transformers-5 Qwen-VL weight names (visual.*, model.layers.*) to the current layout."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key[len("model.") :]
    return key


def _read_tensors(path: Path, wanted: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = _canonical_key(key)
                if name in wanted:
                    t = f.get_tensor(key)
                    tensors[name] = t.to(dtype) if t.is_floating_point() else t
    return tensors


def load_config(path: str | Path):
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in MODEL_CLASSES:
        raise ModelLoadError(f"unsupported model family {config.model_type!r}: expected one of {list(MODEL_CLASSES)}")
    return config


def load_model(cfg: ModelConfig, part: str = "full") -> PreTrainedModel:
    """The Qwen-VL model in `cfg.path`, whole or with only its `vision` or `language` half.

    A half is the full model class with the other half's modules set to None; its weights are the
    only ones read from disk.
    """
    if part not in PARTS:
        raise ModelLoadError(f"part={part!r} is invalid: expected one of {PARTS}")
    device, dtype, attn = cfg.resolved()
    config = load_config(cfg.path)
    cls = MODEL_CLASSES[config.model_type]
    if part == "full":
        model = cls.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attn)
    else:
        with init_empty_weights(include_buffers=False):
            model = cls._from_config(config, attn_implementation=attn, dtype=dtype)
        if part == "vision":
            model.model.language_model = None
            model.lm_head = None
        else:
            model.model.visual = None
        wanted = {name for name, _ in model.named_parameters()}
        model.load_state_dict(_read_tensors(Path(cfg.path), wanted, dtype), strict=False, assign=True)
        if part == "language" and model.lm_head.weight.is_meta and config.tie_word_embeddings:
            model.lm_head.weight = model.model.language_model.embed_tokens.weight
        missing = [name for name, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ModelLoadError(f"{cfg.path} lacks {len(missing)} {part} tensors, e.g. {missing[:3]}")
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(path)


def load_image_processor(path: str | Path):
    return AutoImageProcessor.from_pretrained(path)
