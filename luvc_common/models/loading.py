"""Load VLM checkpoints of a supported family from a local HF directory, whole or as one half.

The encoder service needs the vision tower with its projector and no LLM weights; the LLM service
needs the language model and no vision weights. Each half is transformers' own model class built
on the meta device with the other half removed, then filled with just its tensors from the
safetensors files, so neither service reads or holds the other's weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from luvc_common.config import ModelConfig
from luvc_common.errors import ConfigError, ModelLoadError
from luvc_common.models.family import MODULES, Family, family_of
PARTS = ("full", "vision", "language")
DTYPES = ("float32", "bfloat16", "float16")


def resolve(cfg: ModelConfig) -> tuple[torch.device, torch.dtype, str]:
    """(device, dtype, attention implementation) that `cfg`'s auto values resolve to on this machine."""
    device = resolve_device(cfg.device)
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif cfg.dtype in DTYPES:
        dtype = getattr(torch, cfg.dtype)
    else:
        raise ModelLoadError(f"dtype={cfg.dtype!r} is invalid: expected auto or one of {list(DTYPES)}")
    attn = cfg.attn_implementation
    if attn == "auto":
        attn = "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"
    return device, dtype, attn


def resolve_device(name: str) -> torch.device:
    """A --device value as a torch.device; ConfigError for an unknown name or CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f'--device {name!r}: expected "auto", "cpu", "cuda" or "cuda:N"') from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    return files


def _read_tensors(path: Path, family: Family, wanted: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = family.canonical_key(key)
                if name in wanted:
                    t = f.get_tensor(key)
                    tensors[name] = t.to(dtype) if t.is_floating_point() else t
    return tensors


def load_config(path: str | Path):
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in MODULES:
        raise ModelLoadError(f"unsupported model family {config.model_type!r}: expected one of {list(MODULES)}")
    return config


def load_model(cfg: ModelConfig, part: str = "full") -> PreTrainedModel:
    """The model in `cfg.path`, whole or with only its `vision` or `language` half.

    A half is the full model class with the other half's modules set to None; its weights are the
    only ones read from disk.
    """
    if part not in PARTS:
        raise ModelLoadError(f"part={part!r} is invalid: expected one of {PARTS}")
    device, dtype, attn = resolve(cfg)
    config = load_config(cfg.path)
    family = family_of(config)
    cls = family.model_class
    if part == "full":
        model = cls.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attn)
    else:
        with init_empty_weights(include_buffers=False):
            model = cls._from_config(config, attn_implementation=attn, dtype=dtype)
        family.drop(model, part)
        wanted = {name for name, _ in model.named_parameters()}
        model.load_state_dict(_read_tensors(Path(cfg.path), family, wanted, dtype), strict=False, assign=True)
        if part == "language" and model.lm_head.weight.is_meta and config.tie_word_embeddings:
            model.lm_head.weight = family.language(model).embed_tokens.weight
        missing = [name for name, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ModelLoadError(f"{cfg.path} lacks {len(missing)} {part} tensors, e.g. {missing[:3]}")
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(path)


def load_image_processor(path: str | Path):
    return AutoImageProcessor.from_pretrained(path)
