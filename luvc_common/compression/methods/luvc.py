"""LUVC: OIM merge steps between vision blocks (DESIGN 2.1), the SPU cascade between decoder layers (DESIGN 2.2)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from luvc_common.compression import spu
from luvc_common.compression.config import CompressionConfig, OIMConfig, SPUConfig
from luvc_common.compression.methods.base import (DECODER_LAYERS, VISION_BLOCKS, LayerInputs, LayerPruner, Method, Row,
                                                  keep_members, members)
from luvc_common.errors import ConfigError

PARTS = {"oim": (OIMConfig, "merge_depths"), "spu": (SPUConfig, "stages")}
"""Part -> (its config class, the field whose spec value "none" turns the part off). A part that is off by default
(CompressionConfig's field) is on, with its class defaults, as soon as a spec sets any of its knobs."""


def _on_by_default(part: str) -> bool:
    return next(f for f in fields(CompressionConfig) if f.name == part).default is not None


class SPUCascade(LayerPruner):
    """Before each stage's layer, every media item is cut to its stage's share of its LLM-input tokens."""

    def __init__(self, cfg: SPUConfig, num_layers: int):
        self.cfg = cfg
        self.ratios = spu.stage_layers(cfg.stages, num_layers)
        self.layers = frozenset(self.ratios)
        self.state: dict[tuple[int, int], object] = {}
        """Per (row, item): the last stage's low-pass (select) or grid (resample)."""

    def prune(self, inputs: LayerInputs) -> list[Row]:
        step = self._select if self.cfg.mode == "select" else self._resample
        return [step(inputs, b, self.ratios[inputs.layer]) for b in range(len(inputs.hidden))]

    def _select(self, inputs: LayerInputs, b: int, ratio: float) -> Row:
        """Drop each item's tokens with the smallest high-frequency residual."""
        row = inputs.row(b)
        hidden, source = row[0], row[3]

        def choose(j, span, mine):
            kept, self.state[b, j] = spu.select(
                hidden[mine], span.cell(source[mine]).to(hidden.device), span.grid,
                round(ratio * span.length), self.cfg.cutoff, self.cfg.window, self.state.get((b, j)),
            )
            return kept

        return keep_members(row, inputs.spans[b], choose)

    def _resample(self, inputs: LayerInputs, b: int, ratio: float) -> Row:
        """Replace each item's tokens by a smaller spectrally resampled grid of tokens, with positions
        (every axis of them) at the new cells' centres (float) in the item's original coordinates."""
        hidden, cos, sin, source = inputs.row(b)
        spans, positions = inputs.spans[b], inputs.positions[:, b]
        item = torch.full_like(source, -1)
        for j, s in enumerate(spans):
            item[members(source, s)] = j
        valid = (source >= 0).nonzero().flatten()
        pieces, offset, done = [], 0, set()
        runs, counts = torch.unique_consecutive(item[valid], return_counts=True)
        for j, n in zip(runs.tolist(), counts.tolist()):
            idx = valid[offset : offset + n]
            offset += n
            if j < 0:
                on_device = idx.to(hidden.device)
                pieces.append((hidden[on_device], cos[on_device], sin[on_device], source[idx]))
                continue
            if ratio == 0 or j in done:  # an item in several runs (frames) is resampled whole where its first run was
                continue
            done.add(j)
            s = spans[j]
            grid, new = self.state.get((b, j), s.grid), spu.resampled_grid(s.grid, round(ratio * s.length))
            self.state[b, j] = new
            x = spu.spectral_resample(hidden[members(source, s).to(hidden.device)].view(*grid, -1), new[1:]).to(hidden.dtype)
            pos = spu.resampled_positions(positions[:, s.cells].view(len(positions), *s.grid), new[1:])
            c, si = inputs.rotary(x[None], pos.reshape(len(pos), 1, -1).to(hidden.device))
            pieces.append((x.reshape(-1, x.shape[-1]), c[0], si[0], s.cells[: x.shape[:3].numel()]))
        return tuple(torch.cat(parts) for parts in zip(*pieces))


@dataclass(frozen=True)
class LUVC(Method):
    acts: tuple[str, ...] = (VISION_BLOCKS, DECODER_LAYERS)
    spec_keys: ClassVar[dict[str, str]] = {
        "merges": "merge_depths", "axis": "first_axis", "positions": "positions", "llm_positions": "llm_positions",
        "spu": "stages", "cutoff": "cutoff", "window": "window", "mode": "mode",
    }

    def config(self, **knobs) -> CompressionConfig:
        parts, key = {}, {name: k for k, name in self.spec_keys.items()}
        for part, (cls, switch) in PARTS.items():
            mine = {f.name: knobs[f.name] for f in fields(cls) if f.name in knobs}
            if switch in mine and mine[switch] is None:
                if len(mine) > 1:
                    others = ", ".join(key[name] for name in mine if name != switch)
                    raise ConfigError(f"method luvc: {key[switch]}=none turns {part} off, so {others} cannot be set")
                parts[part] = None
            elif mine or _on_by_default(part):
                parts[part] = cls(**mine)
            else:
                parts[part] = None
        return CompressionConfig(method=self.name, **parts)

    def knobs(self, cfg: CompressionConfig) -> dict[str, object]:
        """An off part reports its switch as None and its other knobs at their class defaults, so a spec names
        only what differs from the method's default."""
        values: dict[str, object] = {}
        for part, (cls, switch) in PARTS.items():
            config = getattr(cfg, part)
            values.update({f.name: getattr(config or cls(), f.name) for f in fields(cls)})
            if config is None:
                values[switch] = None
        return values

    def pruner(self, cfg: CompressionConfig, num_layers: int) -> SPUCascade | None:
        return SPUCascade(cfg.spu, num_layers) if cfg.spu else None


METHOD = LUVC("luvc")
