"""Write the placeholder default model: a tiny Qwen2-VL with deterministic random weights.

Usage: python tools/make_random_model.py [OUT_DIR] [--family MODEL_TYPE] [--seed N]   (model types: models/family.py MODULES)
"""
import argparse

from luvc_common.models.family import MODULES
from luvc_common.config import DEFAULT_MODEL
from luvc_common.models.tiny import save_random_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("out", nargs="?", default=str(DEFAULT_MODEL))
parser.add_argument("--family", default="qwen2_vl", choices=list(MODULES))
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
print(save_random_checkpoint(args.out, args.family, args.seed))
