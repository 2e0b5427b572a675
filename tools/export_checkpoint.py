"""Export a `luvc train` checkpoint (a run's ckpt.pt, e.g. of a run still training) as a standard HF model directory.

Usage: python tools/export_checkpoint.py CKPT OUT_DIR [model flags of the run: --max-pixels, --rope-theta, --text-layers ...]
Only the model is written (bf16 safetensors, configs, tokenizer); the training-only VisionProbe stays in the checkpoint.
"""
import argparse
import sys

import torch

from luvc_common.research.train import _tokenizer, add_arguments, build_model, export_model

ckpt, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
args = add_arguments(argparse.ArgumentParser()).parse_args(flags)
model = build_model(args, _tokenizer())
state = torch.load(ckpt, weights_only=False, map_location="cpu")
model.load_state_dict(state["model"])
print(f"step {state['step']} exported to {export_model(model, _tokenizer(), args.max_pixels, out)}")
