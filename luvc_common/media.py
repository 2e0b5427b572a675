"""Decode, check and patchify images and videos for a Qwen-VL vision tower.

Every input is checked against Limits before it is decoded in full, so a hostile or broken file
becomes a MediaError that names the limit, never a crash or an out-of-memory.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from luvc_common.config import FRAME_SUFFIXES, Limits
from luvc_common.errors import MediaError




@dataclass
class Media:
    kind: str
    """"image" or "video"."""
    frames: list[Image.Image]
    """RGB frames (one for an image)."""


def decode_image(data: bytes, limits: Limits, name: str = "image") -> Image.Image:
    if not data:
        raise MediaError(f"{name}: empty data")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h == 0:
            raise MediaError(f"{name}: zero-size image ({w}x{h})")
        if w * h > limits.max_image_pixels:
            raise MediaError(f"{name}: {w}x{h} = {w * h} pixels exceeds max_image_pixels={limits.max_image_pixels}")
        return img.convert("RGB")
    except UnidentifiedImageError:
        raise MediaError(f"{name}: unreadable image (unknown or corrupt format)") from None
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise MediaError(f"{name}: unreadable image ({e})") from None


def load_image(path: str | Path, limits: Limits) -> Media:
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such image file")
    return Media("image", [decode_image(path.read_bytes(), limits, str(path))])


def video_from_frames(frames: list[bytes], limits: Limits, name: str = "video") -> Media:
    """A video from encoded frames in order; every frame is resized to the first frame's size."""
    if not frames:
        raise MediaError(f"{name}: no frames")
    limits.check_count("max_frames", len(frames), f"{name} frames")
    images = [decode_image(f, limits, f"{name} frame {i}") for i, f in enumerate(frames)]
    return Media("video", [im if im.size == images[0].size else im.resize(images[0].size) for im in images])


def load_video_dir(path: str | Path, limits: Limits) -> Media:
    path = Path(path)
    if not path.is_dir():
        raise MediaError(f"{path}: not a directory of frames")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    limits.check_count("max_frames", len(files), f"{path} frames")  # before reading any file
    return video_from_frames([f.read_bytes() for f in files], limits, str(path))


def patchify(media: list[Media], image_processor) -> tuple[Tensor, Tensor]:
    """Flattened patches and (t, h, w) patch grids of all items, in order, as the vision tower wants.

    Images go through the image processor unchanged. A video's frames are each processed as an
    image (which repeats the frame over the temporal patch) and consecutive frames are then
    interleaved into temporal patches; an odd last group repeats the last frame, as Qwen-VL does.
    """
    tp = image_processor.temporal_patch_size
    pixels, grids = [], []
    for item in media:
        processed = [image_processor(images=f, return_tensors="pt") for f in item.frames]
        if item.kind == "image":
            pixels.append(processed[0]["pixel_values"])
            grids.append(processed[0]["image_grid_thw"][0])
            continue
        per_frame = [p["pixel_values"].view(len(p["pixel_values"]), 3, tp, -1)[:, :, 0] for p in processed]
        per_frame += per_frame[-1:] * (-len(per_frame) % tp)
        groups = [torch.stack(per_frame[i : i + tp], dim=2).flatten(1) for i in range(0, len(per_frame), tp)]
        pixels.append(torch.cat(groups))
        _, h, w = processed[0]["image_grid_thw"][0].tolist()
        grids.append(torch.tensor([len(groups), h, w]))
    return torch.cat(pixels), torch.stack(grids)
