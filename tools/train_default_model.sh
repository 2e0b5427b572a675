#!/usr/bin/env bash
# The default model's training recipe (docs/training.md, "Twelfth session" and "Thirteenth session"): a tiny Qwen2-VL
# (3.5M parameters, rope_theta 100) from scratch on SynthVQA with training-only levers (none is exported: the export
# is a stock Qwen2VLForConditionalGeneration):
#   --aux-weight 2 --aux-balanced  a dense per-visual-token loss (colour, shape, character, tallest bar) that weighs
#                                  object tokens like the background;
#   --cell-layer 0                 visual tokens leaving LLM layer 0 learn which third of the image they are in;
#   --pointer-weight 1             head 0 of LLM layers 1 and 2 learns to attend where each answer is drawn;
#   --question-weight 1            LLM layer 0's output at the answer position learns which colour and shape the
#                                  question names (since the seventeenth session: without it head 0 spread its
#                                  attention over every object, whichever was asked about);
#   --augment                      rendering variety (colours, background, sizes, fonts);
#   --questions 8                  up to 7 more questions of the first turn's task about the same image.
# Stages (each a fresh optimizer and warm-up/cosine schedule over its own time budget):
#   objects  the four object tasks, distractors ramped 0 -> 3 over the first 1,000 steps (95 min on 2 cores);
#            measured only before the thirteenth session's fix of the extra turns (they used to leak answers);
#   lone     colour and shape on lone objects (12 min: colour leaves its prior within ~200 steps);
#   shape    shape alone on lone objects (10 min: beside colour it did not move);
#   mix      all six tasks at lr 5e-4, distractors ramped 0 -> 3 over 800 steps (55 min); the kept weights'
#            last stage until the twenty-fifth session, which keeps colour and shape above chance (at lr 2e-3 they fell back to their priors);
#            read drawn twice as often and --char-slots 4 (each visual token's digits in reading order) since the
#            fourteenth session, whose last kept weights came from 85 minutes of these flags without the ramp
#            (--curriculum 0, --minutes 85; read still 0: docs/training.md). The fifteenth session's kept weights
#            came from those by a 30-min `--vision-only` stage and 85 more minutes of these flags with --seed 1502
#            (both commands in docs/training.md; the vision-only stage did not help read, so it is not a stage here).
#            The seventeenth session's kept weights came from those by 45 min of the four object tasks and 25 min of
#            `mix`, both with --question-weight 1 (commands in docs/training.md; the flag is untried from scratch).
#            The eighteenth session's kept weights (73.7%) are 120 more minutes of `mix` from those (lr 5e-4, seed 1801).
#            The twenty-third session's kept weights (74.7%) grew those to 6 LLM layers and ran 95 more minutes of
#            `mix` with count drawn twice (seed 2401); so `mix` builds 6 layers (--text-layers 6), growing a 4-layer
#            --init by two identity layers on top.
#   read     the twenty-fifth session's stage (docs/training.md, "Twenty-fifth session"):
#            read drawn 8 times in 13 with numbers of 1-5 digits, 70% of read scenes cut to 56-px strips (their text
#            at the generator's own size), batch 32, lr 5e-4, 100 min; a read scene asks one question where the others
#            ask up to 8, so at 2 in 8 read got a tenth of the answer loss and never moved. Read-only stages lose the
#            other tasks within 100 steps; this mixture keeps them.
#   read2    the twenty-sixth session's stage ("Twenty-sixth session"; the wip weights' last): the same mixture
#            with numbers of 2-5 digits (one digit was learnt), half of the read scenes cut to strips, count drawn 3
#            times in 15, lr 3e-4, 115 min (kept weights 74.5% -> 77.5%; the session's `read` stage ran 602 more steps
#            before it, not repeated here).
#   hires    the twenty-seventh session's stage ("Twenty-seventh session"): read-heavy at up to 200,704 pixels
#            (each step's budget drawn from 50,176 to 200,704), numbers of 3-5 digits, count drawn 4 times in 15; the
#            weights shipped in the twenty-seventh session were its end (step 2,303 at 150 minutes; read 1 -> 5 on
#            the test split).
#   hires2   the same mixture continued ("Twenty-eighth session"), lr 2e-4, seed 2901: the previous shipped weights
#            were its step 1,412, at 121 minutes of its 150 (test split 76.5% -> 78.3%, count 67 -> 72).
#   hires3   the same mixture again ("Twenty-ninth session"), lr 2e-4, seed 3011, 118 minutes: the previous shipped
#            weights were its end (validation 77.1% -> 77.8%; test split 78.3% both). That session started it from the bf16
#            export of hires2's step 1,412 (fresh training heads) and ran it with --cpu-bf16 from step 215.
#   hires4   the same mixture with the dense loss's character kinds weighed 3x (--char-weight 3; "Thirtieth
#            session"), seed 3111, 112 minutes: the previous shipped weights were its end (validation 77.8% -> 79.1%).
#            That session started it from hires3's bf16 export, with --cpu-bf16 throughout.
#   hires5   the same mixture with --char-weight 6 ("Thirty-first session"), seed 3211, 112 minutes: the shipped weights
#            are its end (validation 79.1% -> 80.1%, test 79.2% -> 80.0%). That session started it from hires4's
#            ckpt.pt with fresh training heads (--init keeps them since; see docs/training.md).
# Resumable: rerunning skips finished stages and continues the current one from its ckpt.pt. On a fresh
# machine (runs/ is not committed) continue from the committed unshipped weights instead of from scratch:
#   RUN=runs/next tools/train_default_model.sh --init models/luvc-tiny-qwen2vl-wip   (runs only the `hires` stages)
# Extra flags go to every stage, e.g. on a GPU box:  tools/train_default_model.sh --device cuda --workers 8
# or on a CPU with AVX512-BF16 (1.7x faster steps on the 2-core EPYC box; docs/training.md, "Twenty-ninth session"):  --cpu-bf16
# Export a checkpoint at any time:
#   .venv/bin/python tools/export_checkpoint.py runs/default/hires5/ckpt.pt runs/default/export --max-pixels 200704 --rope-theta 100 --text-layers 6
# Evaluate with:  .venv/bin/luvc eval --model runs/default/export --methods none,luvc
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE  # degrade gracefully when other jobs share the cores
run=${RUN:-runs/default}
stage() {  # stage NAME FLAGS...: one `luvc train` run in $run/NAME
  mkdir -p "$run/$1"
  .venv/bin/python -m luvc_common.research.train --out "$run/$1" --resume --batch-size 16 --lr 2e-3 --rope-theta 100 \
    --questions 8 --aux-weight 2 --aux-balanced --cell-layer 0 --pointer-weight 1 --pointer-layers 1,2 --question-weight 1 --augment \
    --max-pixels 50176 --max-distractors 3 --eval-n 240 --eval-every 250 --steps 20000 --warmup 50 "${@:2}"
}
if [[ " $* " != *" --init "* && " $* " != *" --init="* ]]; then  # a given --init replaces all but the `hires` stages
  stage objects --seed 1000 --tasks color,shape,position,count --curriculum 1000 --minutes 95 "$@"
  stage lone --seed 1303 --tasks color,shape --max-distractors 0 --minutes 12 "$@" --init "$run/objects/ckpt.pt"
  stage shape --seed 1304 --tasks shape --max-distractors 0 --minutes 10 "$@" --init "$run/lone/ckpt.pt"
  stage mix --seed 1404 --lr 5e-4 --curriculum 800 --minutes 55 --tasks color,shape,count,position,read,read,chart --text-layers 6 \
    --char-slots 4 "$@" --init "$run/shape/ckpt.pt"
  stage read --seed 2602 --lr 5e-4 --batch-size 32 --minutes 100 --text-layers 6 --char-slots 4 --read-digits 1,5 --read-height 56 \
    --strip-share 0.7 --tasks read,read,read,read,read,read,read,read,color,shape,count,position,chart "$@" --init "$run/mix/ckpt.pt"
  stage read2 --seed 2701 --lr 3e-4 --batch-size 32 --minutes 115 --text-layers 6 --char-slots 4 --read-digits 2,5 --read-height 56 \
    --strip-share 0.5 --tasks read,read,read,read,read,read,read,read,color,shape,count,count,count,position,chart "$@" --init "$run/read/ckpt.pt"
  set -- "$@" --init "$run/read2/ckpt.pt"
fi
hires() {  # hires NAME FLAGS...: a stage of the read-heavy mixture at up to 200,704 pixels
  stage "$1" --batch-size 32 --text-layers 6 --char-slots 4 --read-digits 3,5 --read-height 56 --strip-share 0.5 \
    --max-pixels 200704 --low-pixels 50176 --export "$run/export" \
    --tasks read,read,read,read,read,read,read,color,shape,count,count,count,count,position,chart "${@:2}"
}
hires hires --seed 2801 --lr 3e-4 --minutes 150 "$@"
hires hires2 --seed 2901 --lr 2e-4 --minutes 150 "$@" --init "$run/hires/ckpt.pt"
hires hires3 --seed 3011 --lr 2e-4 --minutes 118 "$@" --init "$run/hires2/ckpt.pt"
hires hires4 --seed 3111 --lr 2e-4 --minutes 112 --char-weight 3 "$@" --init "$run/hires3/ckpt.pt"
hires hires5 --seed 3211 --lr 2e-4 --minutes 112 --char-weight 6 "$@" --init "$run/hires4/ckpt.pt"
