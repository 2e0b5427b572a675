"""DART (Wen et al., 2025): before layer K, keep per item the tokens least duplicated with pivot tokens, by layer K-1's keys."""
from __future__ import annotations

from dataclasses import dataclass

from luvc_common.compression import baselines
from luvc_common.compression.config import BaselineConfig, CompressionConfig
from luvc_common.compression.methods.base import LayerBaseline, LayerInputs, LayerPruner, Row, keep_members


class DARTPruner(LayerPruner):
    def __init__(self, cfg: BaselineConfig, layer: int):
        self.cfg, self.layers = cfg, frozenset({layer})

    def prune(self, inputs: LayerInputs) -> list[Row]:
        keys = inputs.cached_keys(inputs.layer - 1).transpose(1, 2).flatten(2)  # (B, L, kv_heads * head_dim)
        normed = inputs.norm(inputs.hidden)
        return [self._row(inputs, b, keys[b], normed[b]) for b in range(len(inputs.hidden))]

    def _row(self, inputs: LayerInputs, b: int, keys, normed) -> Row:
        source = inputs.source[b]

        def choose(j, span, mine):
            mine = mine.to(keys.device)
            text = (source > span.cells[-1]).nonzero().flatten().to(keys.device)  # the prompt after the item
            keep = min(baselines.keep_count(span.length, self.cfg.keep_ratio), len(mine))
            return baselines.dart_keep(keys[mine], keys[text], normed[mine], normed[text], keep, *self.cfg.pivots)

        return keep_members(inputs.row(b), inputs.spans[b], choose)


@dataclass(frozen=True)
class DART(LayerBaseline):
    def pruner(self, cfg: CompressionConfig, num_layers: int) -> DARTPruner:
        return DARTPruner(cfg.baseline, self.first_pruned_layer(cfg, num_layers))


METHOD = DART("dart")
