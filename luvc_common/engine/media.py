"""Probe and decode images and videos (a family patchifies them: models/family.py).

Hostile input is bounded in two passes. `probe_image` reads only a file's header (an allow-listed
format, its size and aspect ratio), so a whole request is checked against Limits before any pixel
is decoded. `decode_image` then decodes one image and, given a target size, shrinks it at once, so
a request never holds more than one full-size frame.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from luvc_common.config import FRAME_SUFFIXES, Limits
from luvc_common.errors import MediaError, shorten

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
"""The only Pillow decoders reachable from a request."""
MAX_ASPECT_RATIO = 200
"""Longest over shortest side; Qwen-VL's resizing refuses more."""


@dataclass
class Media:
    kind: str
    """"image" or "video"."""
    frames: list[Image.Image]
    """RGB frames (one for an image)."""


@dataclass(frozen=True)
class ImageFile:
    """An encoded image whose header was checked: its bytes and size, not yet decoded."""

    data: bytes
    width: int
    height: int
    name: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class MediaFiles:
    """One media item as checked encoded frames."""

    kind: str
    frames: list[ImageFile]


def _open(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise MediaError(f"{name}: unreadable image (not one of {', '.join(IMAGE_FORMATS)}, or corrupt)") from None
    except Image.DecompressionBombError:
        raise MediaError(f"{name}: image header claims too many pixels (a decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{name}: unreadable image ({str(e)[:200]})") from None


def probe_image(data: bytes, limits: Limits, name: str = "image") -> ImageFile:
    """Check an encoded image without decoding its pixels: format, size, pixels and aspect ratio from
    the header, then the file's structure (Pillow's verify)."""
    if not data:
        raise MediaError(f"{name}: empty data")
    img = _open(data, name)
    w, h = img.size
    if w * h == 0:
        raise MediaError(f"{name}: zero-size image ({w}x{h})")
    if w * h > limits.max_image_pixels:
        raise MediaError(f"{name}: {w}x{h} = {w * h} pixels exceeds max_image_pixels={limits.max_image_pixels}")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise MediaError(f"{name}: {w}x{h} has an aspect ratio over {MAX_ASPECT_RATIO}")
    try:
        img.verify()  # chunk structure and checksums, without decoding pixels: corrupt files fail before the queue
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data
        raise MediaError(f"{name}: unreadable image ({shorten(str(e), 200)})") from None
    return ImageFile(data, w, h, name)


def decode_image(image: ImageFile | bytes, limits: Limits, name: str = "image", size: tuple[int, int] | None = None) -> Image.Image:
    """The RGB image, resized to `size` (width, height) right after decoding when given."""
    if not isinstance(image, ImageFile):
        image = probe_image(image, limits, name)
    from transformers.image_transforms import convert_to_rgb  # here: the light paths (client, CLI parser) never decode

    try:
        img = Image.fromarray(convert_to_rgb(_open(image.data, image.name), return_numpy=True))  # transparency on white
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise MediaError(f"{image.name}: unreadable image ({str(e)[:200]})") from None
    return img if size is None or img.size == size else img.resize(size, Image.Resampling.BICUBIC)


def check_request_pixels(items: list[MediaFiles], limits: Limits) -> None:
    total = sum(f.pixels for item in items for f in item.frames)
    if total > limits.max_request_pixels:
        raise MediaError(f"media: {total} pixels in all images and frames exceeds max_request_pixels={limits.max_request_pixels}")


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
    files = [probe_image(f, limits, f"{name} frame {i}") for i, f in enumerate(frames)]
    check_request_pixels([MediaFiles("video", files)], limits)
    size = (files[0].width, files[0].height)
    return Media("video", [decode_image(f, limits, size=size) for f in files])


def load_video_dir(path: str | Path, limits: Limits) -> Media:
    path = Path(path)
    if not path.is_dir():
        raise MediaError(f"{path}: not a directory of frames")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    limits.check_count("max_frames", len(files), f"{path} frames")  # before reading any file
    return video_from_frames([f.read_bytes() for f in files], limits, str(path))
