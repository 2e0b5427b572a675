"""FastV (Chen et al., 2024): before layer K, keep the visual tokens the last prompt token attends to most in layer K-1."""
from __future__ import annotations

from dataclasses import dataclass

from luvc_common.compression import baselines
from luvc_common.compression.config import BaselineConfig, CompressionConfig
from luvc_common.compression.methods.base import LayerBaseline, LayerInputs, LayerPruner, Row, keep_members


class FastVPruner(LayerPruner):
    def __init__(self, cfg: BaselineConfig, layer: int):
        self.cfg, self.layers, self.attention_layer = cfg, frozenset({layer}), layer - 1

    def prune(self, inputs: LayerInputs) -> list[Row]:
        return [self._row(inputs, b) for b in range(len(inputs.hidden))]

    def _row(self, inputs: LayerInputs, b: int) -> Row:
        attention = inputs.attention[b]

        def choose(j, span, mine):
            keep = min(baselines.keep_count(span.length, self.cfg.keep_ratio), len(mine))
            return baselines.fastv_keep(attention[:, mine.to(attention.device)], keep)

        return keep_members(inputs.row(b), inputs.spans[b], choose)


@dataclass(frozen=True)
class FastV(LayerBaseline):
    def pruner(self, cfg: CompressionConfig, num_layers: int) -> FastVPruner:
        return FastVPruner(cfg.baseline, self.first_pruned_layer(cfg, num_layers))


METHOD = FastV("fastv")
