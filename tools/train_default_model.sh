#!/usr/bin/env bash
# The training run of docs/training.md (NOT shipped: below the accuracy bar): a tiny Qwen2-VL (3.5M parameters)
# trained from scratch on SynthVQA (training seed 1000, 224x224 max) for 31 min on 2 CPU threads, then exported as bf16.
# Resumable: rerunning continues from runs/train/ckpt.pt. Evaluate with `luvc eval --methods none,luvc`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/train
export OMP_WAIT_POLICY=PASSIVE  # degrade gracefully when other jobs share the 2 cores
exec .venv/bin/python -m luvc_common.train --out runs/train --resume \
  --steps 4000 --batch-size 16 --lr 1e-3 --warmup 100 --min-lr-frac 0.05 --weight-decay 0.1 --seed 1000 \
  --max-pixels 50176 --text-layers 4 --vision-depth 4 --vision-dim 128 --hidden 256 \
  --eval-every 250 --eval-n 120 --ckpt-minutes 5 --minutes 31 \
  --export runs/train/export "$@"
