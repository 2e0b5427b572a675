"""The `luvc` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys

from luvc_common.config import DEFAULT_MODEL, Limits, ModelConfig, build, leaves

from luvc_common.compression.methods import NAMES, method_config
from luvc_common.errors import UserError

METHOD_HELP = (f"compression method: one of {', '.join(NAMES)}; baselines take a budget, "
               "e.g. tome:keep=0.25 or fastv:keep=0.25,layer=0.1 (default: luvc)")


def _config_args(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per leaf of the config tree `cls` (--max-media, --model, ...): its type the default's, its
    help the field's docstring, its default from the environment when set there (how docker-compose
    passes them); `cli_required` metadata makes it required. The dataclasses validate the values."""
    for leaf in leaves(cls):
        default = leaf.field.default
        required = leaf.field.metadata.get("cli_required", False)
        note = "required" if required else f"default {default}" + (f"; env {leaf.env}" if leaf.env else "")
        p.add_argument("--" + leaf.name.replace("_", "-"), type=leaf.kind, default=os.environ.get(leaf.env, default) if leaf.env else default,
                       required=required, help=f"{leaf.doc} ({note})")


def cmd_generate(args: argparse.Namespace) -> int:
    from luvc_common.engine.media import load_image, load_video_dir
    from luvc_common.engine.pipeline import Pipeline

    limits = Limits()
    media = [load_image(p, limits) for p in args.image] + ([load_video_dir(args.video, limits)] if args.video else [])
    compression = method_config(args.method)
    pipeline = Pipeline(build(ModelConfig, vars(args)), limits)
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


def _passive_omp() -> None:
    """OpenMP threads that sleep instead of spinning when idle, unless the environment says otherwise:
    a service shares its cores with the other service and its clients (measured on 2 shared cores:
    the default tiny tower took 1,050 ms per image with spinning threads, 100 ms with one thread).
    Must run before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cmd_serve_encoder(args: argparse.Namespace) -> int:
    _passive_omp()
    from encoder_service.config import EncoderConfig
    from encoder_service.service import EncoderServicer
    from luvc_common.serving.runtime import ServerConfig

    EncoderServicer.run(build(EncoderConfig, vars(args)), build(ServerConfig, vars(args)))
    return 0


def cmd_serve_llm(args: argparse.Namespace) -> int:
    """The same LLMConfig and ServerConfig for the plain server and for Ray Serve."""
    _passive_omp()
    from llm_service.config import LLMConfig
    from luvc_common.serving.runtime import ServerConfig

    config, server = build(LLMConfig, vars(args)), build(ServerConfig, vars(args))
    if args.ray:
        from llm_service.ray_app import run_llm_on_ray

        run_llm_on_ray(config, server)
    else:
        from llm_service.service import LLMServicer

        LLMServicer.run(config, server)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    import grpc

    from luvc_common.client import ClientOptions, LUVCClient, image_file, stats_to_json, video_dir

    media = [image_file(p) for p in args.image] + ([video_dir(args.video)] if args.video else [])
    options = ClientOptions(token=args.token, tls_ca=args.tls_ca, application=args.application)
    try:
        with LUVCClient(args.target, options) as client:
            stats = None
            for chunk in client.stream(args.prompt, media, method=args.method, max_new_tokens=args.max_new_tokens, timeout=args.timeout):
                if not args.json:
                    print(chunk.text, end="", flush=True)
                if chunk.HasField("stats"):
                    stats = chunk.stats
    except grpc.RpcError as e:
        print(f"{e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if stats is None:
        print("UNKNOWN: the stream ended without a final answer", file=sys.stderr)
        return 1
    out = stats_to_json(stats)
    if args.json:
        print(json.dumps(out))
    else:
        v, t = out["visual_tokens"], out["timings_ms"]
        print()
        print(
            f"[{out['method']}] visual tokens: ViT patches {v['vit_patches']} -> encoder out {v['encoder_out']} -> LLM per layer "
            f"{v['llm_per_layer']}; payload {out['payload_bytes']} B (uncompressed {out['payload_bytes_uncompressed']} B); "
            + ", ".join(f"{k} {t[k]:.1f} ms" for k in ("encode", "transfer", "prefill", "decode", "total") if k in t),
            file=sys.stderr,
        )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from luvc_common.client import check_health

    status = check_health(args.target, timeout=args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Both services as real processes on free loopback ports, one question through the client."""
    import tempfile
    from pathlib import Path

    from luvc_common.serving.launch import Service

    logs = Path(tempfile.mkdtemp(prefix="luvc-demo-"))
    encoder = Service(["encoder", "--model", args.model], logs / "encoder.log")
    llm = Service(["llm", "--model", args.model, "--encoder", encoder.target], logs / "llm.log")
    try:
        print(f"starting encoder on {encoder.target} and LLM service on {llm.target} (logs in {logs}) ...", file=sys.stderr)
        encoder.start(wait=False)
        llm.start()
        encoder.wait_status("SERVING")
        for method in ("none", "luvc", "luvc:merges=0.5"):  # the default luvc, then with one OIM step (half the payload)
            print(f"\n$ luvc client --target {llm.target} --image {args.image} --prompt {args.prompt!r} --method {method}", file=sys.stderr)
            argv = ["client", "--target", llm.target, "--image", args.image, "--prompt", args.prompt, "--method", method]
            if (code := main(argv)) != 0:
                return code
    finally:
        for service in (llm, encoder):
            service.stop()
    print("\nservices stopped", file=sys.stderr)
    return 0


def cmd_train(argv: list[str]) -> int:
    """Its flags live with the trainer (luvc_common.research.train), which imports torch only when used."""
    from luvc_common.research.train import add_arguments, train

    train(add_arguments(argparse.ArgumentParser(prog="luvc train")).parse_args(argv))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from luvc_common.research.synthvqa import write_dataset

    print(write_dataset(args.out, args.n, args.seed, progress=True, task=args.task, side=args.side, read_digits=args.read_digits))
    return 0


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="answer a prompt about images/video in this process")
    g.add_argument("--image", action="append", default=[], metavar="PATH")
    g.add_argument("--video", metavar="DIR_OF_FRAMES")
    g.add_argument("--prompt", required=True)
    g.add_argument("--method", default="luvc", help=METHOD_HELP)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    _config_args(g, ModelConfig)
    g.set_defaults(func=cmd_generate)


def _add_serve(sub) -> None:
    """`serve encoder|llm`: flags generated from each service's config tree and ServerConfig, the same for
    the plain server and --ray."""
    from encoder_service.config import EncoderConfig
    from llm_service.config import LLMConfig
    from luvc_common.serving.runtime import ServerConfig

    serve = sub.add_parser("serve", help="run a gRPC service").add_subparsers(dest="service", required=True)
    for name, config, func in (("encoder", EncoderConfig, cmd_serve_encoder), ("llm", LLMConfig, cmd_serve_llm)):
        p = serve.add_parser(name, help=f"the {name} service")
        _config_args(p, ServerConfig)
        _config_args(p, config)
        if name == "llm":
            p.add_argument("--ray", action="store_true", help="deploy on Ray Serve (RAY_ADDRESS or a local instance) behind its gRPC proxy")
        p.set_defaults(func=func)


def _add_client(sub) -> None:
    c = sub.add_parser("client", help="ask a running LLM service")
    c.add_argument("--target", required=True, metavar="HOST:PORT")
    c.add_argument("--image", action="append", default=[], metavar="PATH")
    c.add_argument("--video", metavar="DIR_OF_FRAMES")
    c.add_argument("--prompt", required=True)
    c.add_argument("--method", default="luvc", help=METHOD_HELP)
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    c.add_argument("--json", action="store_true")
    c.add_argument("--token", default=os.environ.get("LUVC_AUTH_TOKEN"))
    c.add_argument("--tls-ca")
    c.add_argument("--application", help="Ray Serve application name (behind Ray's gRPC proxy)")
    c.set_defaults(func=cmd_client)


def _add_ops(sub) -> None:
    h = sub.add_parser("health", help="exit 0 when the service at --target is SERVING (plain or behind Ray)")
    h.add_argument("--target", required=True, metavar="HOST:PORT")
    h.add_argument("--timeout", type=float, default=3.0)
    h.set_defaults(func=cmd_health)

    d = sub.add_parser("demo", help="start both services, ask about the bundled image, stop them")
    d.add_argument("--model", default=str(DEFAULT_MODEL))
    d.add_argument("--image", default=str(DEFAULT_MODEL.parents[1] / "assets" / "demo.png"))
    d.add_argument("--prompt", default="What color is the circle?")
    d.set_defaults(func=cmd_demo)


def _add_research(sub) -> None:
    from luvc_common.research.bench import add_bench_parser
    from luvc_common.research.evaluate import add_eval_parser, positive_int
    from luvc_common.research.load import add_load_parser
    from luvc_common.research.synthvqa import READ_DIGITS, SIDES, TASKS, digit_range

    add_eval_parser(sub)
    add_bench_parser(sub)
    add_load_parser(sub)
    sub.add_parser("train", help="train a tiny Qwen2-VL from scratch on SynthVQA (luvc train --help)", add_help=False)
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write a SynthVQA JSONL set")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=positive_int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--task", choices=TASKS, default=None, help="only this task (default: the six in turn)")
    s.add_argument("--side", type=int, choices=SIDES, default=None, metavar="S", help="every image S x S (a multiple of 28, 224-672)")
    s.add_argument("--read-digits", type=digit_range, default=READ_DIGITS, metavar="LOW,HIGH",
                   help=f"digits of each \"read\" number (default: SynthVQA's {READ_DIGITS[0]},{READ_DIGITS[1]})")
    s.set_defaults(func=cmd_data_synth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="luvc", description="LUVC-serve: VLM serving with visual-token compression")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_serve, _add_client, _add_ops, _add_research):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["train"]:  # its own parser, with the trainer
            return cmd_train(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
