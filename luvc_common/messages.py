"""Conversions between the engines' objects and the luvc.v1 messages, validated on the way in."""
from __future__ import annotations

import torch

from luvc_common.config import Limits
from luvc_common.media import Media, decode_image, video_from_frames
from luvc_common.pipeline import EncodedMedia
from luvc_common.proto import luvc_pb2
from luvc_common.errors import MediaError, WireError
from luvc_common.wire import WIRE_DTYPES, TensorSchema, from_wire, to_wire


def media_from_proto(items, limits: Limits) -> list[Media]:
    limits.check_count("max_media", len(items), "media items")
    media = []
    for i, item in enumerate(items):
        kind = item.WhichOneof("kind")
        if kind == "image":
            media.append(Media("image", [decode_image(item.image, limits, f"media[{i}]")]))
        elif kind == "video":
            media.append(video_from_frames(list(item.video.frames), limits, f"media[{i}]"))
        else:
            raise MediaError(f"media[{i}]: neither image nor video set")
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


def encoded_from_proto(msg: luvc_pb2.EncodeResponse, hidden_size: int, unit: int, limits: Limits) -> EncodedMedia:
    """Validate visual tokens received from an encoder (or a client) against this model."""
    limits.check_count("max_media", len(msg.media), "visual.media items")
    kinds, grids, sources, cells = [], [], [], []
    for i, m in enumerate(msg.media):
        grid, source = (m.grid.t, m.grid.h, m.grid.w), (m.source_grid.t, m.source_grid.h, m.source_grid.w)
        if m.kind not in ("image", "video"):
            raise WireError(f"visual.media[{i}].kind={m.kind!r}: expected image or video")
        if min(grid) <= 0 or grid[1] % unit or grid[2] % unit:
            raise WireError(f"visual.media[{i}].grid={list(grid)}: sides must be positive multiples of {unit}")
        full = grid[0] * grid[1] * grid[2] // unit**2
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
    return EncodedMedia(embeds, kinds, grids, sources, int(msg.vit_patches), float(msg.encode_ms), cells)


def uncompressed_payload_bytes(msg: luvc_pb2.EncodeResponse, unit: int) -> int:
    """Bytes the same media's tokens would take without OIM, in the same wire dtype."""
    n = sum(m.source_grid.t * m.source_grid.h * m.source_grid.w // unit**2 for m in msg.media)
    hidden = msg.tokens.shape[1] if len(msg.tokens.shape) == 2 else 0
    return n * hidden * WIRE_DTYPES[msg.tokens.dtype].itemsize if msg.tokens.dtype in WIRE_DTYPES else 0
