"""`luvc bench`: speed of each compression method at a real VLM's shapes, through the real services.

Random weights at the shape of a real model (speed does not depend on the weights): the checkpoint is
written once to a cache directory, an encoder service process serves it on loopback, and the LLM
half runs in this process, as in the LLM service. Per method and repeat (methods interleaved, so all
see the same machine state; one untimed warm-up round first):

- encode_ms: the encoder service's own time; transfer_ms: the Encode RPC's wall time minus encode_ms,
  plus validating and decoding the tokens here; payload_bytes: visual-token bytes on the wire;
- llm_prefill_ms; ttft_ms = Encode RPC + decode + prefill (the first token's logits are ready);
- decode_tok_s: greedy decode steps per second over --decode-tokens steps (EOS ignored);
- kv_cache_bytes after prefill; flops_ratio: theoretical LLM prefill FLOPs, none / method;
- prefill_speedup: median prefill of none / the method's (same run, same inputs), and
  measured_over_theoretical = prefill_speedup / flops_ratio.

    luvc bench --shape small --methods none,luvc,fastv,tome --repeats 5 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from luvc_common.compression.grid import grid_tokens
from luvc_common.config import DEFAULT_MODEL
from luvc_common.compression.config import CompressionConfig
from luvc_common.compression.methods import budget_unset, method_config, method_spec, split_specs
from luvc_common.research.evaluate import int_at_least, positive_int


def _rope(theta: float, mrope_section: list[int] | None = None) -> dict:
    """RoPE parameters: 1D, or Qwen's M-RoPE with (temporal, height, width) frequency sections."""
    return {"rope_type": "default", "rope_theta": theta, **({"mrope_section": mrope_section} if mrope_section else {})}


SHAPES = {
    "tiny": None,  # the bundled default model
    "small": dict(  # SmolVLM-256M's LM; a ViT-B/16-sized tower (86M)
        family="qwen2_vl",
        text=dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                  intermediate_size=1536, rope_parameters=_rope(1000000.0, [8, 12, 12])),
        vision=dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, hidden_size=576),
    ),
    "2b": dict(  # Qwen2-VL-2B
        family="qwen2_vl",
        text=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                  intermediate_size=8960, rope_parameters=_rope(1000000.0, [16, 24, 24])),
        vision=dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4, hidden_size=1536),
    ),
    "internvl-1b": dict(  # InternVL3-1B: InternViT-300M on 448-pixel tiles, a Qwen2.5-0.5B-sized LLM
        family="internvl",
        text=dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                  intermediate_size=4864, rope_parameters=_rope(1000000.0)),
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=448),
    ),
}
"""Model shapes as tiny_config overrides of a family; random weights, our tokenizer (vocabulary size only
changes lm_head on one token)."""


def shape_checkpoint(shape: str, cache: Path) -> Path:
    """A checkpoint directory of `shape` with deterministic random weights, written once under cache."""
    if SHAPES[shape] is None:
        return DEFAULT_MODEL
    out = cache / shape
    if (out / "config.json").exists():
        return out
    from luvc_common.models.tiny import save_random_checkpoint

    sizes = SHAPES[shape]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{shape}-"))
    save_random_checkpoint(tmp, sizes["family"], seed=0, max_pixels=1344 * 1344, init_range=0.02,
                           text_overrides=sizes["text"], vision_overrides=sizes["vision"])
    tmp.rename(out)  # complete or absent, never half written
    return out


def _bench_image(size: int) -> bytes:
    import io

    from PIL import Image

    img = Image.open(Path(__file__).resolve().parents[2] / "assets" / "demo.png").convert("RGB").resize((size, size))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _one(client, engine, hidden: int, limits, media, prompt_for, cfg: CompressionConfig, spec: str, wire: str, decode_tokens: int) -> dict:
    from luvc_common.serving.messages import encoded_from_proto
    from luvc_common.engine.language import Request

    t0 = time.perf_counter()
    response = client.encode(media, method=spec, wire_dtype=wire, timeout=600)
    encoded = encoded_from_proto(response, hidden, engine.unit, limits)
    t1 = time.perf_counter()
    ids = prompt_for(encoded)
    state = engine.prefill([Request(ids, encoded)], cfg)
    token = state.logits.argmax(-1).cpu()
    t2 = time.perf_counter()
    kv = sum(t.numel() * t.element_size() for layer in state.cache.layers for t in (layer.keys, layer.values))
    for _ in range(decode_tokens):
        token = engine.decode_step(state, token).argmax(-1).cpu()
    t3 = time.perf_counter()
    text_tokens = len(ids) - sum(encoded.grid_counts(engine.unit))
    full = sum(grid_tokens(g, engine.unit) for g in encoded.source_grids)
    return dict(
        encode_ms=response.encode_ms, transfer_ms=(t1 - t0) * 1e3 - response.encode_ms, payload_bytes=len(response.tokens.data),
        llm_prefill_ms=(t2 - t1) * 1e3, ttft_ms=(t2 - t0) * 1e3, decode_tok_s=decode_tokens / (t3 - t2) if decode_tokens else 0.0,
        kv_cache_bytes=kv, visual_per_layer=state.visual_per_layer[0],
        tokens_per_layer=[text_tokens + n for n in state.visual_per_layer[0]], uncompressed=[text_tokens + full] * engine.num_layers,
    )


def bench(shape: str, specs: list[str], repeats: int, image_size: int, decode_tokens: int = 16, wire: str = "BF16",
          cache: Path = Path("runs/bench"), threads: int | None = None, progress: bool = True) -> dict:
    """Run the benchmark; returns {"shape", ..., "results": [...]} ("none" first)."""
    import torch
    from tqdm import tqdm

    from luvc_common.client import LUVCClient
    from luvc_common.config import Limits
    from luvc_common.serving.launch import Service
    from luvc_common.config import ModelConfig
    from luvc_common.models.loading import load_model, load_tokenizer
    from luvc_common.engine.language import LanguageEngine
    from luvc_common.models.prompt import build_prompt_ids
    from luvc_common.proto import luvc_pb2

    if threads:
        torch.set_num_threads(threads)
    cache.mkdir(parents=True, exist_ok=True)
    model_dir = shape_checkpoint(shape, cache)
    specs = ["none"] + [s for s in specs if s != "none"]
    configs = {s: method_config(s) for s in specs}
    limits = Limits(max_image_pixels=max(Limits().max_image_pixels, image_size**2))
    model_cfg = ModelConfig(str(model_dir))
    engine = LanguageEngine(load_model(model_cfg, "language"))
    tokenizer = load_tokenizer(str(model_dir))
    hidden = engine.config.text_config.hidden_size
    prompt = "What color is the circle?"

    def prompt_for(encoded):
        return build_prompt_ids(tokenizer, engine.family.chat, prompt, encoded.kinds, encoded.grid_counts(engine.unit), limits.max_prompt_tokens,
                                [t for t, _, _ in encoded.grids])

    media = [luvc_pb2.Media(image=_bench_image(image_size))]
    encoder = Service(["encoder", "--model", str(model_dir), "--max-queue", "4"], cache / f"encoder-{shape}.log", env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    runs: dict[str, list[dict]] = {s: [] for s in specs}
    try:
        encoder.start()
        with LUVCClient(encoder.target) as client:
            run = lambda spec: _one(client, engine, hidden, limits, media, prompt_for, configs[spec], method_spec(configs[spec]), wire, decode_tokens)  # noqa: E731
            # warm-up: none and luvc first, so baselines named without a budget can get luvc's
            # theoretical FLOPs ratio (the default 0.25 when luvc is not benchmarked)
            warm = {s: run(s) for s in specs if s in ("none", "luvc")}
            if "luvc" in warm:
                configs = _match_budgets(configs, warm["none"], warm["luvc"], engine)
            for spec in specs:
                if spec not in warm:
                    run(spec)
            bar = tqdm(total=repeats * len(specs), desc=f"bench {shape}", unit="run", disable=not progress)
            for _ in range(repeats):
                for spec in specs:
                    runs[spec].append(run(spec))
                    bar.update()
            bar.close()
    finally:
        encoder.stop()

    results = _summarise(runs, configs, engine.config.text_config)
    return {"shape": shape, "model": str(model_dir), "image": f"{image_size}x{image_size}", "repeats": repeats,
            "decode_tokens": decode_tokens, "wire_dtype": wire, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "torch": torch.__version__, "results": results}


def _match_budgets(configs: dict, none: dict, luvc: dict, engine) -> dict:
    """Baselines named without a budget get the keep ratio at luvc's theoretical FLOPs ratio."""
    from luvc_common.compression.flops import flops_ratio, with_matched_budget

    text_config = engine.config.text_config
    target = flops_ratio(none["uncompressed"], luvc["tokens_per_layer"], text_config)
    visual = none["visual_per_layer"][0]
    return {s: with_matched_budget(cfg, target, none["tokens_per_layer"][0] - visual, visual, text_config, engine.num_layers)
            if budget_unset(s) else cfg for s, cfg in configs.items()}


def _summarise(runs: dict[str, list[dict]], configs: dict, text_config) -> list[dict]:
    """One row per method: medians (and minima) over the repeats, FLOPs ratio and prefill speedup against none."""
    from luvc_common.compression.flops import flops_ratio

    none_prefill = statistics.median(r["llm_prefill_ms"] for r in runs["none"])
    results = []
    for spec, rs in runs.items():
        ratio = flops_ratio(rs[0]["uncompressed"], rs[0]["tokens_per_layer"], text_config)
        speedup = none_prefill / statistics.median(r["llm_prefill_ms"] for r in rs)
        row = {"method": spec, "keep_ratio": configs[spec].baseline.keep_ratio if configs[spec].baseline else None,
               "payload_bytes": rs[0]["payload_bytes"], "kv_cache_bytes": rs[0]["kv_cache_bytes"],
               "visual_per_layer": rs[0]["visual_per_layer"], "flops_ratio": ratio, "prefill_speedup": speedup,
               "measured_over_theoretical": speedup / ratio}
        for key in ("encode_ms", "transfer_ms", "llm_prefill_ms", "ttft_ms", "decode_tok_s"):
            values = [r[key] for r in rs]
            row[key], row[f"{key}_min"] = statistics.median(values), min(values)
        results.append(row)
    return results


def format_table(report: dict) -> str:
    cols = [("method", "{:<22}", "method"), ("payload B", "{:>10}", "payload_bytes"), ("encode ms", "{:>9.1f}", "encode_ms"),
            ("xfer ms", "{:>8.1f}", "transfer_ms"), ("prefill ms", "{:>10.1f}", "llm_prefill_ms"), ("min", "{:>8.1f}", "llm_prefill_ms_min"),
            ("TTFT ms", "{:>8.1f}", "ttft_ms"), ("dec tok/s", "{:>9.1f}", "decode_tok_s"), ("KV MiB", "{:>7.2f}", "kv_cache_bytes"),
            ("FLOPs x", "{:>7.2f}", "flops_ratio"), ("prefill x", "{:>9.2f}", "prefill_speedup"), ("meas/theo", "{:>9.2f}", "measured_over_theoretical")]
    head = "  ".join(f"{name:>{len(fmt.format(0) if 'f' in fmt else fmt.format(''))}}" if i else f"{name:<22}" for i, (name, fmt, _) in enumerate(cols))
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        cells = [fmt.format(r[key] / 2**20 if key == "kv_cache_bytes" else r[key]) for _, fmt, key in cols]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `bench` subcommand."""
    p = subparsers.add_parser("bench", help="speed of compression methods at real model shapes, random weights",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="small")
    p.add_argument("--methods", default="none,luvc", help='comma-separated method specs; baselines without a budget get luvc\'s FLOPs ratio')
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--image-size", type=int_at_least(28), default=672, help="side of the square test image in pixels (>= 448 for real shapes)")
    p.add_argument("--decode-tokens", type=int_at_least(0), default=16)
    p.add_argument("--wire-dtype", default="BF16", choices=["BF16", "FP16", "FP32"])
    p.add_argument("--cache", default="runs/bench", help="where random checkpoints of the shapes are written once")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="OUT")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    specs = split_specs(args.methods)
    for s in specs:
        method_config(s)  # a bad spec fails before any model is built
    report = bench(args.shape, specs, args.repeats, args.image_size, args.decode_tokens, args.wire_dtype, Path(args.cache), args.threads)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
