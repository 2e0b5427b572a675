"""Widen a Qwen2-VL model's vision tower, keeping what it computes (Net2WiderNet), to train it further.

Usage: python tools/widen_vision.py IN_DIR OUT_DIR [--factor 2] [--noise 0.1] [--seed 0]
The tower's width (embed_dim) and heads grow by --factor, so the heads keep their width and rotary frequencies.
Every channel of the residual stream, attention head and MLP unit gets factor - 1 copies; a layer reading copies
splits the original weight among them in random shares summing to 1, so with --noise 0 the tower's output (the
merger's, which the LLM reads) is unchanged but for bf16 rounding. Exact copies barely separate under AdamW: their
gradients are proportional and Adam's update is scale-free (measured: patch-embedding copies 5% apart after 467
vision-only steps at lr 1e-3), so by default the copies' weights get noise (0.1 of each matrix's standard
deviation: the tower's output moves by about 8% on the shipped model) and start apart. The LLM is kept. With heads
of 32 channels the result is what `luvc train --vision-dim` builds for the wider width, so a run continues it with
`--init OUT_DIR --vision-dim WIDTH`. No model card is written: it is a starting point, not a shipped model.
"""
import argparse

import numpy as np
import torch
from torch import Tensor

from luvc_common.config import ModelConfig
from luvc_common.errors import ModelLoadError
from luvc_common.models.loading import load_image_processor, load_model, load_tokenizer
from luvc_common.models.tiny import save_model


def copies(blocks: int, width: int, factor: int) -> Tensor:
    """For an axis of `blocks` consecutive groups of `width` channels, widened to groups of factor * width: the
    original channel each new channel copies."""
    return (torch.arange(blocks)[:, None] * width + torch.arange(factor * width) % width).flatten()


def widen(w: Tensor, rows: Tensor | None, cols: Tensor | None, noise: float, g: torch.Generator) -> Tensor:
    """`w` with its output axis gathered by `rows` and its input axis (of a weight matrix) by `cols`; each original
    input's weight is split among its copies in random shares, so the layer's output on copied inputs is unchanged.
    The copied rows of a weight matrix get gaussian noise of `noise` times the matrix's standard deviation."""
    if rows is not None:
        copied = torch.ones(len(rows), dtype=torch.bool)
        copied[np.unique(rows.numpy(), return_index=True)[1]] = False
        scale = noise * w.std() if w.dim() > 1 else 0.0
        w = w[rows]
        w[copied] += scale * torch.randn(w[copied].shape, generator=g)
    if cols is None:
        return w
    draw = torch.rand(cols.numel(), generator=g) + 0.5
    shares = draw / torch.zeros(w.shape[1]).index_add_(0, cols, draw)[cols]
    return w[:, cols] * shares


def widen_tower(state: dict[str, Tensor], dim: int, hidden: int, factor: int, noise: float = 0.0, seed: int = 0) -> dict[str, Tensor]:
    """The vision tensors of a Qwen2-VL state dict (tower of width `dim`, MLP width `hidden`, merger over 2 x 2
    patches) for a tower `factor` times as wide; other tensors unchanged."""
    g = torch.Generator().manual_seed(seed)
    stream, mlp, merged = copies(1, dim, factor), copies(1, hidden, factor), copies(1, 4 * dim, factor)
    layout = {  # tensor name suffix: (output axis copies, input axis copies)
        "patch_embed.proj.weight": (stream, None),
        "norm1.weight": (stream, None), "norm1.bias": (stream, None), "norm2.weight": (stream, None),
        "norm2.bias": (stream, None), "ln_q.weight": (stream, None), "ln_q.bias": (stream, None),
        "attn.qkv.weight": (copies(3, dim, factor), stream), "attn.qkv.bias": (copies(3, dim, factor), None),
        "attn.proj.weight": (stream, stream), "attn.proj.bias": (stream, None),
        "mlp.fc1.weight": (mlp, stream), "mlp.fc1.bias": (mlp, None),
        "mlp.fc2.weight": (stream, mlp), "mlp.fc2.bias": (stream, None),
        "merger.mlp.0.weight": (merged, copies(4, dim, factor)), "merger.mlp.0.bias": (merged, None),
        "merger.mlp.2.weight": (None, merged), "merger.mlp.2.bias": (None, None),
    }
    out = {}
    for name, w in state.items():
        if ".visual." not in f".{name}":
            out[name] = w
            continue
        suffix = next((s for s in layout if name.endswith(s)), None)
        if suffix is None:
            raise SystemExit(f"{name}: not a tensor of the Qwen2-VL tower this tool knows how to widen")
        out[name] = widen(w, *layout[suffix], noise, g)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.1,
                   help="std of the noise on the copies' weights, relative to each matrix's; 0: the same outputs exactly")
    p.add_argument("--seed", type=int, default=0, help="of the random shares and noise")
    args = p.parse_args(argv)
    if args.factor < 2:
        p.error("--factor must be at least 2")
    try:
        model = load_model(ModelConfig(args.source, dtype="float32", device="cpu"))
    except ModelLoadError as e:
        raise SystemExit(str(e)) from None
    vision = model.config.vision_config
    if model.config.model_type != "qwen2_vl" or vision.spatial_merge_size != 2:
        raise SystemExit(f"{args.source}: widens Qwen2-VL towers with 2 x 2 merging; this is {model.config.model_type}")
    state = widen_tower(model.state_dict(), vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio), args.factor, args.noise, args.seed)
    vision.embed_dim, vision.num_heads = args.factor * vision.embed_dim, args.factor * vision.num_heads
    wide = type(model)(model.config)
    wide.load_state_dict(state)
    save_model(wide, load_tokenizer(args.source), load_image_processor(args.source), args.out)
    print(f"tower widened to {vision.embed_dim} channels, {vision.num_heads} heads: {args.out}")


if __name__ == "__main__":
    main()
