"""Average the weights of HF model directories of one architecture (a model soup; SWA over a run's exports).

Usage: python tools/average_models.py OUT_DIR MODEL_DIR MODEL_DIR [MODEL_DIR ...]
Each MODEL_DIR holds one model.safetensors with the same tensor names and shapes and the same config.json (tensors
of one shape can still mean different things, e.g. under another rotary base). The uniform mean is taken in
float32 and saved in the first directory's dtypes; configs, tokenizer and processor files are copied from the first
directory. The model card (README.md) is not copied: the soup is a new model and needs its own.
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def average(dirs: list[Path]) -> dict[str, torch.Tensor]:
    states = [load_file(d / WEIGHTS) for d in dirs]
    first = states[0]
    for d, state in zip(dirs[1:], states[1:]):
        if state.keys() != first.keys():
            raise SystemExit(f"{d} has other tensors than {dirs[0]}: {sorted(state.keys() ^ first.keys())[:5]}")
        if bad := [k for k in first if state[k].shape != first[k].shape]:
            raise SystemExit(f"{d} differs in shape from {dirs[0]} at {bad[:5]}")
    return {k: (sum(s[k].float() for s in states) / len(states)).to(first[k].dtype) for k in first}


def main(out: str, *models: str) -> None:
    if len(models) < 2:
        raise SystemExit(__doc__)
    dirs = [Path(m) for m in models]
    if missing := [str(d) for d in dirs if not (d / WEIGHTS).is_file()]:
        raise SystemExit(f"no single-file {WEIGHTS} in {missing}")
    if other := [str(d) for d in dirs[1:] if json.loads((d / "config.json").read_text()) != json.loads((dirs[0] / "config.json").read_text())]:
        raise SystemExit(f"config.json of {other} differs from {dirs[0]}'s: not one architecture")
    soup = average(dirs)
    Path(out).mkdir(parents=True, exist_ok=True)
    for f in dirs[0].iterdir():
        if f.is_file() and f.name not in (WEIGHTS, "README.md"):
            shutil.copy2(f, Path(out) / f.name)
    save_file(soup, Path(out) / WEIGHTS, metadata={"format": "pt"})
    print(f"mean of {len(dirs)} models written to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
