"""The two halves of a LUVC VLM as engines, and both together in one process.

VisionEncoder (vision tower + OIM) and TextGenerator (LLM + SPU) are what the encoder and LLM
services wrap; Pipeline chains them in-process for `luvc generate`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from luvc_common.config import Limits

from luvc_common.compression.config import CompressionConfig
from luvc_common.compression.methods import get, method_spec
from luvc_common.compression.methods.base import VisionTower
from luvc_common.compression.visual import VisualTokens
from luvc_common.engine.language import LanguageEngine, Request
from luvc_common.engine.media import Media, MediaFiles, decode_image
from luvc_common.errors import MediaError, PromptError
from luvc_common.models.family import family_of
from luvc_common.config import ModelConfig
from luvc_common.models.loading import load_image_processor, load_model, load_tokenizer
from luvc_common.models.prompt import build_prompt_ids, check_question


@dataclass
class EncodedMedia(VisualTokens):
    """What the encoder hands the LLM side: the visual tokens, their grids (merged; the source grids
    before merging), media kinds and encoder figures."""

    vit_patches: int = 0
    encode_ms: float = 0.0

    @classmethod
    def empty(cls, hidden_size: int) -> "EncodedMedia":
        """No media: a text-only request."""
        return cls(torch.zeros(0, hidden_size), [])

    def split(self, items_per_part: list[int], unit: int) -> list["EncodedMedia"]:
        """The encoder output of several requests' media, encoded together, as one EncodedMedia each."""
        counts, parts, item, row = self.token_counts(unit), [], 0, 0
        for n in items_per_part:
            items, rows = slice(item, item + n), sum(counts[item : item + n])
            parts.append(EncodedMedia(self.embeds[row : row + rows], self.grids[items], self.cells[items], kinds=self.kinds[items],
                                      source_grids=self.source_grids[items], encode_ms=self.encode_ms,
                                      vit_patches=sum(t * h * w for t, h, w in self.source_grids[items])))
            item, row = item + n, row + rows
        return parts


@dataclass
class GenerateResult:
    model: str
    method: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    visual_tokens: dict
    timings_ms: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def encode(tower: VisionTower, pixel_values: torch.Tensor, grid_thw: torch.Tensor, compression: CompressionConfig | None = None,
           check: Callable[[], None] = lambda: None) -> VisualTokens:
    """The vision tower and its projector with the compression method's encoder part; check() runs
    between blocks (it raises to stop a cancelled request).

    pixel_values: the image processor's flattened patches for all media items, in order;
    grid_thw: (n_items, 3) their patch grids.
    """
    method = get(compression.method if compression else "none")
    return method.encode(tower, tower.embed(pixel_values, grid_thw), compression or method.config(), check)


class VisionEncoder:
    def __init__(self, model_cfg: ModelConfig):
        model = load_model(model_cfg, "vision")
        self.family = family_of(model.config)
        self.visual = self.family.vision(model)
        self.tower = self.family.tower(self.visual)
        self.image_processor = load_image_processor(model_cfg.path)
        self.unit = self.tower.unit

    def planned_size(self, width: int, height: int, kind: str = "image") -> tuple[int, int]:
        """(width, height) the image processor resizes an image of this size to."""
        return self.family.planned_size(self.image_processor, width, height, kind)

    def patches(self, items: list[MediaFiles]) -> int:
        """ViT patches the media will make after resizing, from their headers."""
        return sum(self.family.vit_patches(self.image_processor, item.kind, item.frames[0].width, item.frames[0].height, len(item.frames))
                   for item in items)

    def check_patches(self, items: list[MediaFiles], limits: Limits) -> None:
        """Refuse a request whose media would make more than limits.max_vit_patches patches: from
        the headers, before anything is decoded."""
        total = self.patches(items)
        if total > limits.max_vit_patches:
            raise MediaError(f"media: {total} ViT patches after resizing exceeds max_vit_patches={limits.max_vit_patches}")

    def decode(self, items: list[MediaFiles], limits: Limits, check: Callable[[], None] = lambda: None) -> list[Media]:
        """Decode checked media, each frame shrunk to its processed size at once; check() runs
        between frames (it raises to stop)."""
        media = []
        for item in items:
            size = self.planned_size(item.frames[0].width, item.frames[0].height, item.kind)
            frames = []
            for f in item.frames:
                check()
                frames.append(decode_image(f, limits, size=size))
            media.append(Media(item.kind, frames))
        return media

    @torch.no_grad()
    def encode(self, media: list[Media], compression: CompressionConfig, check: Callable[[], None] = lambda: None) -> EncodedMedia:
        """check() runs between vision blocks (it raises to stop)."""
        t0 = time.perf_counter()
        if not media:
            return EncodedMedia.empty(self.family.embed_dim(self.visual))
        pixels, grid_thw = self.family.patchify(media, self.image_processor)
        out = encode(self.tower, pixels, grid_thw, compression, check)
        return EncodedMedia(
            out.embeds, out.grids, out.cells, kinds=[m.kind for m in media], source_grids=[tuple(int(v) for v in g) for g in grid_thw.tolist()],
            vit_patches=int(grid_thw.prod(1).sum()), encode_ms=(time.perf_counter() - t0) * 1e3,
        )


class TextGenerator:
    def __init__(self, model_cfg: ModelConfig, limits: Limits = Limits()):
        self.engine = LanguageEngine(load_model(model_cfg, "language"))
        self.chat = self.engine.family.chat
        self.tokenizer = load_tokenizer(model_cfg.path)
        self.limits = limits
        self.model_path = model_cfg.path

    def check(self, question: str, max_new_tokens: int) -> None:
        """Request checks that need no media, so a service can fail fast before calling the encoder."""
        check_question(question, self.limits.max_prompt_chars)
        if not 0 < max_new_tokens <= self.limits.max_new_tokens:
            raise PromptError(f"max_new_tokens={max_new_tokens} is outside [1, {self.limits.max_new_tokens}]")

    def prompt_ids(self, question: str, encoded: EncodedMedia) -> list[int]:
        counts = encoded.grid_counts(self.engine.unit)
        return build_prompt_ids(self.tokenizer, self.chat, question, encoded.kinds, counts, self.limits.max_prompt_tokens,
                                [t for t, _, _ in encoded.grids])

    def generate(
        self, question: str, encoded: EncodedMedia, compression: CompressionConfig, max_new_tokens: int, on_step=None,
        ids: list[int] | None = None,
    ) -> GenerateResult:
        """`ids`: the prompt ids when the caller has already built them with prompt_ids()."""
        self.check(question, max_new_tokens)
        ids = ids or self.prompt_ids(question, encoded)
        gen = self.engine.generate([Request(ids, encoded)], compression, max_new_tokens, on_step=on_step)
        return self.result(ids, encoded, compression, gen.token_ids[0], gen.visual_per_layer[0], gen.prefill_ms, gen.decode_ms)

    def result(self, ids: list[int], encoded: EncodedMedia, compression: CompressionConfig, tokens: list[int],
               visual_per_layer: list[int], prefill_ms: float, decode_ms: float) -> GenerateResult:
        """The record of one answered request."""
        return GenerateResult(
            model=self.model_path, method=method_spec(compression), prompt_ids=ids, token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            visual_tokens={
                "vit_patches": encoded.vit_patches,
                "encoder_out": len(encoded.embeds),
                "llm_per_layer": visual_per_layer,
                "grids": [list(g) for g in encoded.grids],
                "source_grids": [list(g) for g in encoded.source_grids],
            },
            timings_ms={"encode": encoded.encode_ms, "prefill": prefill_ms, "decode": decode_ms},
        )


class Pipeline:
    """Encoder and generator in one process."""

    def __init__(self, model_cfg: ModelConfig = ModelConfig(), limits: Limits = Limits()):
        self.encoder = VisionEncoder(model_cfg)
        self.generator = TextGenerator(model_cfg, limits)
        self.limits = limits

    def generate(self, media: list[Media], question: str, compression: CompressionConfig, max_new_tokens: int = 32) -> GenerateResult:
        self.limits.check_count("max_media", len(media), "media items")
        t0 = time.perf_counter()
        encoded = self.encoder.encode(media, compression)
        result = self.generator.generate(question, encoded, compression, max_new_tokens)
        result.timings_ms["total"] = (time.perf_counter() - t0) * 1e3
        return result
