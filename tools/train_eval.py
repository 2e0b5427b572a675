"""Per-task SynthVQA accuracy of a model through the serving Pipeline (greedy, exact match).

Usage: python tools/train_eval.py [MODEL_DIR] [--seed 3000] [--n 600] [--methods none luvc] [--json OUT]
Examples are make_example(seed, i) for i < n, generated in memory (n/6 per task).
"""
import argparse
import json
import time

import torch
from tqdm import tqdm

from luvc_common.config import method_config
from luvc_common.media import Media
from luvc_common.models.loading import DEFAULT_MODEL, ModelConfig
from luvc_common.pipeline import Pipeline
from luvc_common.synthvqa import TASKS, make_example, normalize_answer, render

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
parser.add_argument("--seed", type=int, default=3000)
parser.add_argument("--n", type=int, default=600)
parser.add_argument("--methods", nargs="+", default=["none"])
parser.add_argument("--json", default=None, help="also write the results here")
args = parser.parse_args()
torch.set_num_threads(2)
pipe = Pipeline(ModelConfig(args.model))
examples = [make_example(args.seed, i) for i in range(args.n)]
images = [Media("image", [render(ex.scene)]) for ex in examples]
results = {}
for method in args.methods:
    hits: dict[str, list[bool]] = {t: [] for t in TASKS}
    t0 = time.time()
    for ex, image in zip(tqdm(examples, desc=method), images):
        pred = pipe.generate([image], ex.question, method_config(method), max_new_tokens=8).text
        hits[ex.task].append(normalize_answer(pred) == normalize_answer(ex.answer))
    acc = {t: sum(h) / len(h) for t, h in hits.items()}
    results[method] = {"all": sum(map(sum, hits.values())) / args.n, **acc, "seconds": round(time.time() - t0, 1)}
    print(method, " ".join(f"{k}={v:.3f}" if k != "seconds" else f"{k}={v}" for k, v in results[method].items()), flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump({"model": args.model, "seed": args.seed, "n": args.n, "results": results}, f, indent=2)
