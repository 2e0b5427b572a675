"""The `luvc` command line."""
from __future__ import annotations

import argparse
import json
import sys

from luvc_common.config import METHOD_NAMES, ConfigError, Limits, method_config
from luvc_common.media import MediaError, load_image, load_video_dir
from luvc_common.models.loading import DEFAULT_MODEL, ModelConfig, ModelLoadError
from luvc_common.prompt import PromptError

USER_ERRORS = (ConfigError, MediaError, PromptError, ModelLoadError)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="local HF checkpoint directory")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--device", default="auto", help="torch device or auto")


def cmd_generate(args: argparse.Namespace) -> int:
    from luvc_common.pipeline import Pipeline

    limits = Limits()
    media = [load_image(p, limits) for p in args.image] + ([load_video_dir(args.video, limits)] if args.video else [])
    compression = method_config(args.method)
    pipeline = Pipeline(ModelConfig(args.model, args.dtype, args.device), limits)
    result = pipeline.generate(media, args.prompt, compression, args.max_new_tokens)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        v = result.visual_tokens
        print(result.text)
        print(
            f"[{result.method}] visual tokens: ViT patches {v['vit_patches']} -> encoder out {v['encoder_out']}"
            f" -> LLM per layer {v['llm_per_layer']}; prefill {result.timings_ms['prefill']:.1f} ms",
            file=sys.stderr,
        )
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from luvc_common.synthvqa import write_dataset

    print(write_dataset(args.out, args.n, args.seed, progress=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="luvc", description="LUVC-serve: VLM serving with visual-token compression")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about images/video in this process")
    g.add_argument("--image", action="append", default=[], metavar="PATH")
    g.add_argument("--video", metavar="DIR_OF_FRAMES")
    g.add_argument("--prompt", required=True)
    g.add_argument("--method", default="luvc", choices=METHOD_NAMES)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    _model_args(g)
    g.set_defaults(func=cmd_generate)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write a SynthVQA JSONL set")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_data_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
