"""Conversions between the engines' objects and the luvc.v1 messages, validated on the way in."""
from __future__ import annotations

import torch

import math

from luvc_common.compression.grid import grid_tokens
from luvc_common.config import Limits
from luvc_common.engine.media import MediaFiles, check_request_pixels, probe_image
from luvc_common.engine.pipeline import EncodedMedia
from luvc_common.proto import luvc_pb2
from luvc_common.errors import MediaError, WireError, shorten
from luvc_common.serving.wire import WIRE_DTYPES, TensorSchema, from_wire, to_wire


def media_files_from_proto(items, limits: Limits) -> list[MediaFiles]:
    """The request's media checked from their headers (counts, formats, sizes, total pixels); nothing decoded."""
    limits.check_count("max_media", len(items), "media items")
    media = []
    for i, item in enumerate(items):
        kind = item.WhichOneof("kind")
        if kind == "image":
            media.append(MediaFiles("image", [probe_image(item.image, limits, f"media[{i}]")]))
        elif kind == "video":
            if not item.video.frames:
                raise MediaError(f"media[{i}]: video without frames")
            limits.check_count("max_frames", len(item.video.frames), f"media[{i}] frames")
            media.append(MediaFiles("video", [probe_image(f, limits, f"media[{i}] frame {j}") for j, f in enumerate(item.video.frames)]))
        else:
            raise MediaError(f"media[{i}]: neither image nor video set")
    check_request_pixels(media, limits)
    return media


def _grid(g) -> luvc_pb2.Grid:
    return luvc_pb2.Grid(t=g[0], h=g[1], w=g[2])


def encoded_to_proto(encoded: EncodedMedia, unit: int, wire_dtype: str, model: str) -> luvc_pb2.EncodeResponse:
    return luvc_pb2.EncodeResponse(
        tokens=to_wire(encoded.embeds, wire_dtype),
        media=[
            luvc_pb2.MediaTokens(kind=k, grid=_grid(g), source_grid=_grid(s), num_tokens=n, cells=[] if c is None else c.tolist())
            for k, g, s, n, c in zip(encoded.kinds, encoded.grids, encoded.source_grids, encoded.token_counts(unit), encoded.cells)
        ],
        vit_patches=encoded.vit_patches,
        encode_ms=encoded.encode_ms,
        model=model,
    )


def _check_grids(msg: luvc_pb2.EncodeResponse, unit: int, limits: Limits) -> None:
    """Grids within the prompt budget and consistent with vit_patches, before anything is allocated for them."""
    full = source = 0
    for i, m in enumerate(msg.media):
        grid, src = (m.grid.t, m.grid.h, m.grid.w), (m.source_grid.t, m.source_grid.h, m.source_grid.w)
        if min(grid) <= 0 or grid[1] % unit or grid[2] % unit:
            raise WireError(f"visual.media[{i}].grid={list(grid)}: sides must be positive multiples of {unit}")
        if min(src) <= 0 or any(s < g for s, g in zip(src, grid)):
            raise WireError(f"visual.media[{i}].source_grid={list(src)}: expected positive sides, none below grid {list(grid)}")
        full += grid_tokens(grid, unit)
        source += math.prod(src)
        if full > limits.max_prompt_tokens or source > limits.max_vit_patches:
            raise WireError(f"visual.media: grids of {full}+ LLM tokens / {source}+ ViT patches exceed max_prompt_tokens="
                            f"{limits.max_prompt_tokens} / max_vit_patches={limits.max_vit_patches}")
    if msg.vit_patches != source:
        raise WireError(f"visual.vit_patches={msg.vit_patches} does not match the source grids ({source} patches)")
    if not (math.isfinite(msg.encode_ms) and 0 <= msg.encode_ms <= 3.6e6):
        raise WireError(f"visual.encode_ms={msg.encode_ms}: expected a duration in [0, 3.6e6] ms")


def encoded_from_proto(msg: luvc_pb2.EncodeResponse, hidden_size: int, unit: int, limits: Limits) -> EncodedMedia:
    """Validate visual tokens received from an encoder (or a client) against this model and the limits."""
    limits.check_count("max_media", len(msg.media), "visual.media items")
    _check_grids(msg, unit, limits)
    kinds, grids, sources, cells = [], [], [], []
    for i, m in enumerate(msg.media):
        grid, source = (m.grid.t, m.grid.h, m.grid.w), (m.source_grid.t, m.source_grid.h, m.source_grid.w)
        if m.kind not in ("image", "video"):
            raise WireError(f"visual.media[{i}].kind={shorten(repr(m.kind), 40)}: expected image or video")
        full = grid_tokens(grid, unit)
        if m.cells:
            c = torch.tensor(list(m.cells), dtype=torch.long)
            if len(c) != m.num_tokens or c[0] < 0 or c[-1] >= full or (len(c) > 1 and bool((c[1:] <= c[:-1]).any())):
                raise WireError(f"visual.media[{i}].cells: expected num_tokens={m.num_tokens} strictly increasing "
                                f"indices in [0, {full}) for grid {list(grid)}")
            cells.append(c)
        elif m.num_tokens != full:
            raise WireError(f"visual.media[{i}].num_tokens={m.num_tokens} does not match grid {list(grid)}")
        else:
            cells.append(None)
        kinds.append(m.kind)
        grids.append(grid)
        sources.append(source)
    n_tokens = sum(m.num_tokens for m in msg.media)
    embeds = from_wire(msg.tokens, TensorSchema("visual.tokens", (n_tokens, hidden_size)))
    return EncodedMedia(embeds, grids, cells, kinds=kinds, source_grids=sources, vit_patches=int(msg.vit_patches), encode_ms=float(msg.encode_ms))


def uncompressed_payload_bytes(msg: luvc_pb2.EncodeResponse, unit: int) -> int:
    """Bytes the same media's tokens would take without OIM, in the same wire dtype."""
    n = sum(grid_tokens((m.source_grid.t, m.source_grid.h, m.source_grid.w), unit) for m in msg.media)
    hidden = msg.tokens.shape[1] if len(msg.tokens.shape) == 2 else 0
    return n * hidden * WIRE_DTYPES[msg.tokens.dtype].itemsize if msg.tokens.dtype in WIRE_DTYPES else 0
