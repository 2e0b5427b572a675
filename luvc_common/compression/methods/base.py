"""What a compression method is: where it acts, which spec keys it takes, how its budget is matched.

A method acts in the encoder (between vision blocks or after the tower: fewer tokens cross the wire),
between decoder layers, or both. It touches a model only through two small views that each model
family provides: `VisionTower` for the encoder side, `LayerInputs` for the LLM side.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Protocol

import torch
from torch import Tensor

from luvc_common.compression.config import BaselineConfig, CompressionConfig, OIMConfig
from luvc_common.compression.grid import Grid
from luvc_common.compression.oim import TokenGrid, merge_layers, merge_step, step_axes
from luvc_common.compression.visual import VisualTokens
from luvc_common.errors import ConfigError

VISION_BLOCKS, AFTER_TOWER, DECODER_LAYERS = "between vision blocks", "after the vision tower", "between decoder layers"


class VisionTower(Protocol):
    """A model family's vision tower as the methods see it. Tokens are in block-major order (one
    projector group of unit x unit patches after another)."""

    unit: int
    """Side of the projector's patch group: one LLM token per unit x unit patches."""
    depth: int
    """Number of vision blocks."""
    full_attention: bool
    """Every block attends over a whole frame (no windows)."""

    def run_blocks(self, tokens: TokenGrid, blocks: range, check: Callable[[], None]) -> Tensor:
        """Hidden states after `blocks`, each item (frame) its own attention segment."""

    def project(self, x: Tensor) -> Tensor:
        """The projector: (n * unit^2, C) features -> (n, D) LLM tokens."""

    def keys(self, block: int, x: Tensor) -> Tensor:
        """(N, heads, head_dim) attention keys of `block` on its input x, before rotary."""

    def proportional_block(self, block: int, x: Tensor, positions: Tensor, size_log: Tensor) -> Tensor:
        """`block` over one segment with log(size) of each key added to the attention logits."""

    def attention_received(self, block: int, x: Tensor, positions: Tensor) -> Tensor:
        """(N,) attention probability each token of one segment receives in `block`, averaged over
        heads and queries."""


@dataclass
class Span:
    """One media item's placeholders in a prompt row: one run, or one run per frame (InternVL's video)."""

    cells: Tensor
    """(n,) increasing prompt indices of the item's placeholders, one per cell of its grid in raster order."""
    grid: Grid
    """LLM-token grid (t, h / unit, w / unit)."""

    @property
    def length(self) -> int:
        return len(self.cells)

    def cell(self, source: Tensor) -> Tensor:
        """Raster index in the grid of the placeholders at prompt indices `source`."""
        return torch.searchsorted(self.cells, source)


Row = tuple[Tensor, Tensor, Tensor, Tensor]
"""One prompt row entering a layer: (hidden (L, D), cos (L, R), sin (L, R), source (L,)), where source
is each token's index in the original prompt (-1 for padding)."""


@dataclass
class LayerInputs:
    """The batch entering decoder layer `layer`, with what methods may read about it."""

    layer: int
    hidden: Tensor
    """(B, L, D)."""
    cos: Tensor
    sin: Tensor
    source: Tensor
    """(B, L) index of each token in its original prompt row; -1 for padding."""
    spans: list[list[Span]]
    """Per row, its media items' placeholder runs (original prompt coordinates)."""
    positions: Tensor
    """(axes, B, L0) the original prompt's position ids: one axis for 1D RoPE, three for Qwen's M-RoPE."""
    cached_keys: Callable[[int], Tensor]
    """layer -> (B, kv_heads, L, head_dim) keys that layer cached (rotated), for the tokens it saw."""
    norm: Callable[[Tensor], Tensor]
    """The decoder's final norm."""
    rotary: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    """(x, position ids (axes, B, L)) -> (cos, sin)."""
    attention: Tensor | None = None
    """(B, heads, L) attention of the last query in the layer a pruner asked for (`attention_layer`)."""

    def row(self, b: int) -> Row:
        return self.hidden[b], self.cos[b], self.sin[b], self.source[b]


def members(source: Tensor, span: Span) -> Tensor:
    """Indices into a row of the tokens that belong to `span`."""
    return torch.isin(source, span.cells).nonzero().flatten()


def gather(row: Row, keep: Tensor) -> Row:
    """The row's tokens where `keep` (on source's device) is True."""
    idx = keep.nonzero().flatten()
    hidden, cos, sin, source = row
    return hidden[idx.to(hidden.device)], cos[idx.to(cos.device)], sin[idx.to(sin.device)], source[idx]


def keep_members(row: Row, spans: list[Span], choose: Callable[[int, Span, Tensor], Tensor]) -> Row:
    """The row with, per item, only the members `choose(item, span, members)` keeps (indices into members)."""
    keep = row[3] >= 0
    for j, s in enumerate(spans):
        mine = members(row[3], s)
        if len(mine) == 0:
            continue
        drop = torch.ones(len(mine), dtype=torch.bool)
        drop[choose(j, s, mine).cpu()] = False
        keep[mine[drop]] = False
    return gather(row, keep)


class LayerPruner:
    """Per-prefill state of a method that prunes between decoder layers."""

    layers: frozenset[int] = frozenset()
    """Layers before which `prune` runs."""
    attention_layer: int | None = None
    """A layer whose last-query attention weights `prune` needs (LayerInputs.attention)."""

    def prune(self, inputs: LayerInputs) -> list[Row]:
        raise NotImplementedError


def split_items(tokens: TokenGrid) -> list[TokenGrid]:
    """One TokenGrid per media item."""
    counts = [t * h * w for t, h, w in tokens.grids]
    parts = zip(*(v.split(counts) for v in (tokens.hidden, tokens.sizes, tokens.positions)), tokens.grids)
    return [TokenGrid(*values, (g,)) for *values, g in parts]


def units(x: Tensor, unit: int) -> Tensor:
    """(N, ...) block-major tokens -> (N / unit^2, unit^2, ...): one row per projector group = LLM token."""
    return x.reshape(-1, unit * unit, *x.shape[1:])


def run_tower(tower: VisionTower, tokens: TokenGrid, oim: OIMConfig | None, check: Callable[[], None]) -> VisualTokens:
    """The tower and its projector, with OIM's merge steps between blocks when `oim` is set."""
    layers = merge_layers(oim.merge_depths, tower.depth) if oim else []
    start = 0
    for layer, axis in zip(layers, step_axes(len(layers), oim.first_axis) if oim else []):
        tokens = TokenGrid(tower.run_blocks(tokens, range(start, layer), check), tokens.sizes, tokens.positions, tokens.grids)
        tokens = merge_step(tokens, axis, tower.unit, oim.positions)
        start = layer
    return VisualTokens(tower.project(tower.run_blocks(tokens, range(start, tower.depth), check)), list(tokens.grids))


@dataclass(frozen=True)
class Method:
    """A compression method. This base is the uncompressed model ("none")."""

    name: str = "none"
    acts: tuple[str, ...] = ()
    """Where it acts: VISION_BLOCKS, AFTER_TOWER, DECODER_LAYERS."""
    budgeted: ClassVar[bool] = False
    """Takes a token budget (BaselineConfig.keep_ratio), which eval and bench can match to a FLOPs ratio."""
    spec_keys: ClassVar[dict[str, str]] = {}
    """Spec key -> config field it sets ("fastv:keep=0.25,layer=0.1", "luvc:merges=0.25/0.5,cutoff=0.3")."""

    def config(self, **knobs) -> CompressionConfig:
        """The method's default configuration, with the config fields a spec set (field name -> value)."""
        return CompressionConfig(method=self.name, oim=None, spu=None)

    def knobs(self, cfg: CompressionConfig) -> dict[str, object]:
        """Field name -> value in `cfg` of the fields the spec keys set (the inverse of `config`)."""
        return {}

    @property
    def in_encoder(self) -> bool:
        """Acts in the encoder: fewer tokens cross the wire."""
        return bool({VISION_BLOCKS, AFTER_TOWER} & set(self.acts))

    def encode(self, tower: VisionTower, tokens: TokenGrid, cfg: CompressionConfig, check: Callable[[], None]) -> VisualTokens:
        """Visual tokens of the media in `tokens` (the patch embeddings), with this method's encoder part."""
        return run_tower(tower, tokens, cfg.oim, check)

    def pruner(self, cfg: CompressionConfig, num_layers: int) -> LayerPruner | None:
        """Per-prefill pruning state, or None when the method leaves the LLM alone."""
        return None

    def first_pruned_layer(self, cfg: CompressionConfig, num_layers: int) -> int:
        """For budget matching: the first decoder layer that sees the kept tokens only (0: all)."""
        return 0

    def budget(self, cfg: CompressionConfig, keep_ratio: float) -> CompressionConfig:
        """`cfg` with the keep ratio that budget matching found (methods round it to what they can keep)."""
        raise NotImplementedError(f"method {self.name} has no token budget")


@dataclass(frozen=True)
class Baseline(Method):
    """A method whose budget is BaselineConfig.keep_ratio of the visual tokens."""

    spec_keys: ClassVar[dict[str, str]] = {"keep": "keep_ratio"}
    budgeted: ClassVar[bool] = True

    def config(self, **knobs) -> CompressionConfig:
        return CompressionConfig(method=self.name, oim=None, spu=None, baseline=BaselineConfig(**knobs))

    def knobs(self, cfg: CompressionConfig) -> dict[str, object]:
        return {name: getattr(cfg.baseline, name) for name in self.spec_keys.values()}

    def budget(self, cfg: CompressionConfig, keep_ratio: float) -> CompressionConfig:
        return replace(cfg, baseline=replace(cfg.baseline, keep_ratio=round(keep_ratio, 4)))


@dataclass(frozen=True)
class LayerBaseline(Baseline):
    """A budgeted method that prunes once, before decoder layer K = BaselineConfig.layer."""

    acts: tuple[str, ...] = (DECODER_LAYERS,)
    spec_keys: ClassVar[dict[str, str]] = {"keep": "keep_ratio", "layer": "layer"}

    def first_pruned_layer(self, cfg: CompressionConfig, num_layers: int) -> int:
        return pruning_layer(cfg.baseline.layer, num_layers)


def pruning_layer(depth: float, num_layers: int) -> int:
    """Layer K of a relative depth: at least 1, since the scores come from layer K-1."""
    k = max(1, round(depth * num_layers))
    if k >= num_layers:
        raise ConfigError(f"layer={depth} resolves to layer {k} of a {num_layers}-layer LLM: expected < {num_layers}")
    return k
