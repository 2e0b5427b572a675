"""Per-layer visual-token counts and LLM prefill time, none vs luvc, measured in one run.

Usage: python tools/measure_prefill.py [--model DIR] [--image PATH] [--repeats N]
Prints the median prefill time of each method over N runs on the same input and their ratio.
"""
import argparse
import statistics

import torch

from luvc_common.config import Limits, method_config
from luvc_common.media import load_image
from luvc_common.models.loading import DEFAULT_MODEL, ModelConfig
from luvc_common.models.qwen_language import Request
from luvc_common.pipeline import Pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=str(DEFAULT_MODEL))
parser.add_argument("--image", default="assets/demo.png")
parser.add_argument("--prompt", default="What color is the circle?")
parser.add_argument("--repeats", type=int, default=20)
args = parser.parse_args()

torch.set_num_threads(2)
pipe = Pipeline(ModelConfig(args.model))
media = [load_image(args.image, Limits())]
prepared = {}
for name in ("none", "luvc"):
    cfg = method_config(name)
    encoded = pipe.encoder.encode(media, cfg.oim)
    prepared[name] = (cfg, Request(pipe.generator.prompt_ids(args.prompt, encoded), encoded.embeds, encoded.grids))
times = {name: [] for name in prepared}
for _ in range(args.repeats):  # interleaved so both methods see the same machine state
    for name, (cfg, req) in prepared.items():
        gen = pipe.generator.engine.generate([req], cfg.spu, 1)
        times[name].append(gen.prefill_ms)
for name, (cfg, req) in prepared.items():
    counts = pipe.generator.engine.prefill([req], cfg.spu).visual_per_layer[0]
    print(f"{name:5s} prompt tokens {len(req.input_ids):5d}  visual per layer {counts}  "
          f"prefill median {statistics.median(times[name]):7.2f} ms  min {min(times[name]):7.2f} ms")
print(f"prefill time ratio none/luvc (median): {statistics.median(times['none']) / statistics.median(times['luvc']):.2f}")
