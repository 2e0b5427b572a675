#!/usr/bin/env bash
# The staged training run of docs/training.md ("Fourth session"). NOT shipped: below the accuracy bar.
# A tiny Qwen2-VL (3.5M parameters) from scratch on SynthVQA (training seed 1000), in three stages, each
# warm-started from the one before (--init), all at 224x224 training images:
#   1. colour of a lone object (learns in ~200 steps);
#   2. colour, shape, position and count, distractors ramped in over 300 steps, 6 questions per image;
#   3. all six tasks, up to 3 distractors, 8 questions per image; exported with max_pixels 448x448
#      (test images up to 448 px a side keep their native size, so objects keep their trained pixel size).
# Resumable: rerunning skips finished stages and continues the current one from its ckpt.pt.
# Extra flags go to every stage, e.g. on a GPU box:  tools/train_default_model.sh --device cuda --workers 8
# Evaluate with:  .venv/bin/luvc eval --model runs/default/export --methods none,luvc
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE  # degrade gracefully when other jobs share the cores
run=runs/default
stage() {  # stage NAME FLAGS...: one `luvc train` run in $run/NAME
  mkdir -p "$run/$1"
  .venv/bin/python -m luvc_common.train --out "$run/$1" --resume --seed 1000 --batch-size 16 --lr 2e-3 \
    --side 224 --max-pixels 200704 --eval-n 240 "${@:2}"
}
stage st1 --tasks color --max-distractors 0 --steps 300 --warmup 50 --eval-every 150 "$@"
stage st2 --init "$run/st1/ckpt.pt" --tasks color,shape,position,count --curriculum 300 --questions 6 \
  --steps 900 --warmup 30 --eval-every 300 "$@"
stage main --init "$run/st2/ckpt.pt" --questions 8 --steps 7000 --minutes 65 --warmup 50 --eval-every 1000 \
  --export "$run/export" "$@"
