#!/usr/bin/env bash
# The default model's training recipe (docs/training.md, "Sixth session").
# A tiny Qwen2-VL (3.5M parameters, rope_theta 10) from scratch on SynthVQA (training seed 1000), all six tasks
# mixed from the first step, 8 questions per image, up to 3 distractors, with the training-only dense
# per-visual-token loss (--aux-weight) and training-only rendering augmentation (--augment), in two stages:
#   1. fixed 224x224 images (8x8 visual tokens), where objects keep their pixel size (learns faster);
#   2. warm-started from 1 (--init), SynthVQA's varied image sizes downscaled to at most 224x224 pixels, as the
#      exported preprocessor does for every input, so test images look like the training images.
# Resumable: rerunning skips finished stages and continues the current one from its ckpt.pt.
# Extra flags go to every stage, e.g. on a GPU box:  tools/train_default_model.sh --device cuda --workers 8
# An unfinished stage can be exported at any time:
#   .venv/bin/python tools/export_checkpoint.py runs/default/main/ckpt.pt runs/default/export --max-pixels 50176
# Evaluate with:  .venv/bin/luvc eval --model runs/default/export --methods none,luvc
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE  # degrade gracefully when other jobs share the cores
run=${RUN:-runs/default}
stage() {  # stage NAME FLAGS...: one `luvc train` run in $run/NAME
  mkdir -p "$run/$1"
  .venv/bin/python -m luvc_common.research.train --out "$run/$1" --resume --seed 1000 --batch-size 16 --lr 2e-3 --rope-theta 10 \
    --questions 8 --aux-weight 1 --augment --max-pixels 50176 --eval-n 240 --eval-every 500 "${@:2}"
}
stage s224 --side 224 --steps 2000 --minutes 30 --warmup 100 "$@"
stage main --init "$run/s224/ckpt.pt" --steps 20000 --minutes 60 --warmup 50 --export "$run/export" "$@"
