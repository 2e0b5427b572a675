"""Can the tiny Qwen2-VL vision tower see colour and shape at a pixel budget? Trains the tower alone (no LLM) from
scratch on the balanced dense labels of object scenes (train.VisionProbe, --augment looks) and logs, every 100
steps, the probe's accuracy on the object tokens of held-out scenes (validation seed, up to 3 distractors).

    python tools/probe_vision.py --max-pixels 50176 --minutes 20 OUT.jsonl
"""
import argparse
import json
import time

import numpy as np
import torch

import luvc_common.research.train as T
from luvc_common.research.evaluate import VALIDATION_SEED

TASKS = ("color", "shape", "position", "count")


def main() -> None:
    parser = T.add_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("log", help="JSONL file of the held-out accuracies")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer, processor = T._tokenizer(), T.image_processor(args.max_pixels)
    model = T.build_model(args, tokenizer)
    vision, probe = T.FAMILY.vision(model), T.VisionProbe(model, balanced=True)
    optimizer = torch.optim.AdamW([*vision.parameters(), *probe.parameters()], lr=args.lr, betas=(0.9, 0.95))

    def batch(seed: int, indices: range, augment: bool) -> tuple[torch.Tensor, ...]:
        items = [T.encode_example(seed, i, tokenizer, processor, T.Recipe(1, 3, TASKS, None, augment, True)) for i in indices]
        return tuple(torch.cat([it[k] for it in items]) for k in ("pixels", "grid", "aux_labels"))

    held_out = [batch(VALIDATION_SEED, range(i, i + 24), False) for i in range(0, 96, 24)]

    def accuracy() -> dict[str, float]:
        """Per held-out batch of 24 scenes, weighted by its object tokens."""
        scores, weights = [], []
        with torch.no_grad():
            for pixels, grid, labels in held_out:
                vision(pixels, grid_thw=grid)
                scores.append(probe.object_accuracy(labels))
                weights.append(int((labels[:, 1] > 0).sum()))
        return {name: round(float(np.average([s[name] for s in scores], weights=weights)), 3) for name in scores[0]}

    start, step = time.time(), 0
    with open(args.log, "w") as log:
        while time.time() - start < 60 * (args.minutes or 10):  # --minutes, 10 when not given
            pixels, grid, labels = batch(args.seed, range(step * args.batch_size, (step + 1) * args.batch_size), True)
            vision(pixels, grid_thw=grid)
            loss = probe.loss(labels)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vision.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 100 == 0:
                record = dict(step=step, minutes=round((time.time() - start) / 60, 1), loss=round(loss.item(), 3), **accuracy())
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(record, flush=True)


if __name__ == "__main__":
    main()
