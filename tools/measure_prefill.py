"""Per-layer visual-token counts and LLM prefill time, none vs luvc, measured in one run.

Usage: python tools/measure_prefill.py [--shape default|small] [--model DIR] [--image PATH] [--repeats N]
  default: the checkpoint in --model (the bundled tiny model) on --image, through the encoder.
  small:   a random-weight LLM at SmolVLM-256M's LM shape (hidden 576 x 30 layers, 9 heads, 3 KV
           heads) fed random visual tokens of a 672x672 image (48x48 ViT patches), OIM-merged grid
           for luvc. Timing only: the weights are random.
Both methods run interleaved on the same inputs; prints medians and their ratio.
"""
import argparse
import statistics

import torch

from luvc_common.compression.oim import merged_length
from luvc_common.config import DEFAULT_MODEL, Limits, method_config
from luvc_common.models.qwen_language import LanguageEngine, Request

parser = argparse.ArgumentParser()
parser.add_argument("--shape", default="default", choices=["default", "small"])
parser.add_argument("--model", default=str(DEFAULT_MODEL))
parser.add_argument("--image", default="assets/demo.png")
parser.add_argument("--prompt", default="What color is the circle?")
parser.add_argument("--repeats", type=int, default=20)
args = parser.parse_args()
torch.set_num_threads(2)
methods = {name: method_config(name) for name in ("none", "luvc")}

if args.shape == "default":
    from luvc_common.media import load_image
    from luvc_common.models.loading import ModelConfig
    from luvc_common.pipeline import Pipeline

    pipe = Pipeline(ModelConfig(args.model))
    engine = pipe.generator.engine
    media = [load_image(args.image, Limits())]
    requests = {}
    for name, cfg in methods.items():
        encoded = pipe.encoder.encode(media, cfg.oim)
        requests[name] = Request(pipe.generator.prompt_ids(args.prompt, encoded), encoded.embeds, encoded.grids)
else:
    from transformers import Qwen2VLForConditionalGeneration

    from luvc_common.models.tiny import tiny_config
    from luvc_common.prompt import build_prompt_ids
    from luvc_common.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = tiny_config("qwen2_vl", tokenizer, text_layers=30, hidden=576)
    text = config.text_config
    text.intermediate_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim = 1536, 9, 3, 64
    engine = LanguageEngine(Qwen2VLForConditionalGeneration(config).eval())
    grids = {"none": (1, 48, 48), "luvc": (1, 48, merged_length(48, 2))}
    requests = {}
    for name, grid in grids.items():
        n = grid[0] * grid[1] * grid[2] // 4
        ids = build_prompt_ids(tokenizer, args.prompt, ["image"], [n], Limits().max_prompt_tokens)
        requests[name] = Request(ids, torch.randn(n, 576), [grid])

times = {name: [] for name in methods}
for _ in range(args.repeats):  # interleaved so both methods see the same machine state
    for name, cfg in methods.items():
        times[name].append(engine.generate([requests[name]], cfg.spu, 1).prefill_ms)
for name, cfg in methods.items():
    counts = engine.prefill([requests[name]], cfg.spu).visual_per_layer[0]
    print(f"{name:5s} prompt tokens {len(requests[name].input_ids):5d}  visual per layer {counts}  "
          f"prefill median {statistics.median(times[name]):8.2f} ms  min {min(times[name]):8.2f} ms")
print(f"prefill time ratio none/luvc (median): {statistics.median(times['none']) / statistics.median(times['luvc']):.2f}")
