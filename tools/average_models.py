"""Average the weights of model directories of one architecture (a model soup; SWA over a run's exports).

Usage: python tools/average_models.py OUT_DIR MODEL_DIR MODEL_DIR [MODEL_DIR ...]
Each MODEL_DIR is loaded as the services load it (any supported family, sharded or not) and must have the same
config (tensors of one shape can still mean different things, e.g. under another rotary base). The uniform mean is
taken in float32 and written as `luvc train --export` writes a model (bf16 safetensors readable by other users, a
greedy generation config), with the first directory's tokenizer and image processor. No model card is written: the
soup is a new model and needs its own.
"""
import sys

import torch
from transformers import PreTrainedModel

from luvc_common.config import ModelConfig
from luvc_common.errors import ModelLoadError
from luvc_common.models.loading import load_image_processor, load_model, load_tokenizer
from luvc_common.models.tiny import save_model


def architecture(model: PreTrainedModel) -> dict:
    return {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}


def average(models: list[PreTrainedModel]) -> dict[str, torch.Tensor]:
    """Tensor by tensor, the uniform mean of models of one architecture."""
    if other := [m.name_or_path for m in models[1:] if architecture(m) != architecture(models[0])]:
        raise SystemExit(f"the config of {other} differs from {models[0].name_or_path}'s: not one architecture")
    states = [m.state_dict() for m in models]
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


def main(out: str, *paths: str) -> None:
    if len(paths) < 2:
        raise SystemExit(__doc__)
    try:
        models = [load_model(ModelConfig(p, dtype="float32", device="cpu")) for p in paths]
    except ModelLoadError as e:
        raise SystemExit(str(e)) from None
    soup = models[0]
    soup.load_state_dict(average(models))
    save_model(soup, load_tokenizer(paths[0]), load_image_processor(paths[0]), out)
    print(f"mean of {len(paths)} models written to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
