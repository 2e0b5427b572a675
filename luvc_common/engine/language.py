"""A VLM's language model run layer by layer, with a compression method's pruner between layers.

Batching: requests are left-padded into one batch. Pruning removes a different number of tokens
from each row, so after every pruning layer the survivors are re-packed (still left-padded) and each
layer remembers its own padding mask; its KV cache holds exactly the tokens that reached it.
Kept tokens keep their original positions; text tokens are never pruned. Nothing asks the
attention implementation for weights, so sdpa and flash_attention_2 run every layer: a pruner that
scores with attention (FastV) gets the last query's weights in the layer it names, recomputed here
from that layer's input and cached keys (one query row). Nothing is switched on the shared model
for one request. Items whose encoder kept only some grid cells (the
vision-side baselines) get placeholders for the full grid, so positions are the stock ones,
and the absent cells are dropped before the first layer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from transformers import DynamicCache

from luvc_common.compression.config import CompressionConfig
from luvc_common.compression.methods import get
from luvc_common.compression.methods.base import LayerInputs, Span, gather, members
from luvc_common.errors import PromptError, shorten
from luvc_common.models.family import family_of
from luvc_common.compression.visual import VisualTokens


@dataclass
class Request:
    """One prompt with the encoder output for its media items."""

    input_ids: list[int]
    """Prompt ids with each media item's placeholder token repeated once per grid cell."""
    visual: VisualTokens
    """The media items' tokens, in prompt order."""


@dataclass
class PrefillState:
    cache: DynamicCache
    layer_valid: list[Tensor]
    """Per layer, (B, L_i) bool: which cached positions are real tokens."""
    next_position: Tensor
    """(B,) position of the next generated token."""
    logits: Tensor
    """(B, V) next-token logits."""
    visual_per_layer: list[list[int]]
    """Per request, visual tokens entering each decoder layer."""


@dataclass
class Generation:
    token_ids: list[list[int]]
    visual_per_layer: list[list[int]]
    prefill_ms: float
    decode_ms: float


class LanguageEngine:
    """Prefill and greedy decoding over a loaded language half (or full model) of a supported family."""

    def __init__(self, model):
        self.model = model
        self.family = family_of(model.config)
        self.lm = self.family.language(model)
        self.config = model.config
        self.unit = self.family.unit(model.config)
        self.media_token_types = self.family.media_token_types(model.config)

    @property
    def num_layers(self) -> int:
        return len(self.lm.layers)

    def _spans(self, ids: Tensor, req: Request) -> list[Span]:
        positions = torch.isin(ids, torch.tensor(list(self.media_token_types))).nonzero().flatten()
        visual = req.visual
        counts = visual.grid_counts(self.unit)
        present = sum(visual.token_counts(self.unit))
        if len(positions) != sum(counts) or present != len(visual.embeds):
            raise PromptError(
                f"prompt has {len(positions)} visual placeholder tokens, the media grids give {sum(counts)} "
                f"(grids {visual.grids}), {present} of them present, and {len(visual.embeds)} "
                "visual embeddings were supplied"
            )
        runs = torch.unique_consecutive(positions - torch.arange(len(positions)), return_counts=True)[1].tolist()  # contiguous runs
        expected = [n // r for n, kind, (t, _, _) in zip(counts, visual.kinds, visual.grids)
                    for r in [self.family.chat.runs(kind, t)] for _ in range(r)]
        if runs != expected:
            raise PromptError(f"the prompt's visual placeholder runs have lengths {shorten(str(runs), 80)}, "
                              f"the media need contiguous runs of {shorten(str(expected), 80)}")
        return [Span(cells, (t, h // self.unit, w // self.unit)) for cells, (t, h, w) in zip(positions.split(counts), visual.grids)]

    def _mask(self, valid: Tensor, q_len: int, dtype: torch.dtype) -> Tensor | None:
        """Attention mask for queries = the last q_len of `valid`'s keys (causal). None when nothing is
        padded: the kernel then applies causality itself, in memory linear in the length."""
        if bool(valid.all()):
            return None
        if self.config._attn_implementation.startswith("flash"):
            return valid.long()
        k_len = valid.shape[1]
        allowed = valid[:, None, None, :].expand(-1, 1, q_len, -1)
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=valid.device).tril(k_len - q_len)
        itself = causal & ~causal.tril(k_len - q_len - 1)  # padding queries attend to themselves: no empty rows
        allowed = (allowed & causal) | itself
        return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)

    @torch.no_grad()
    def prefill(self, requests: list[Request], compression: CompressionConfig | None) -> PrefillState:
        device, dtype = self.lm.embed_tokens.weight.device, self.lm.embed_tokens.weight.dtype
        width = max(len(r.input_ids) for r in requests)
        ids = torch.full((len(requests), width), self.config.text_config.pad_token_id or 0, dtype=torch.long)
        valid = torch.zeros_like(ids, dtype=torch.bool)
        for b, r in enumerate(requests):
            ids[b, width - len(r.input_ids) :] = torch.tensor(r.input_ids)
            valid[b, width - len(r.input_ids) :] = True
        spans = [[Span(s.cells + width - len(r.input_ids), s.grid) for s in self._spans(torch.tensor(r.input_ids), r)] for r in requests]

        hidden = self.lm.embed_tokens(ids.to(device))
        absent = torch.zeros_like(valid)
        for b, r in enumerate(requests):
            for s, e, c in zip(spans[b], r.visual.embeds.split(r.visual.token_counts(self.unit)), r.visual.cells):
                at = s.cells if c is None else s.cells[c.cpu().long()]
                hidden[b, at.to(device)] = e.to(device, dtype)
                absent[b, s.cells] = True
                absent[b, at] = False
        token_type = torch.zeros_like(ids, dtype=torch.int)
        for token_id, kind in self.media_token_types.items():
            token_type[ids == token_id] = kind
        image_grids, video_grids = [], []
        for b, r in enumerate(requests):
            for s, g in zip(spans[b], r.visual.grids):
                (image_grids if token_type[b, s.cells[0]] == 1 else video_grids).append(list(g))
        position_ids = self.family.position_ids(self.model, ids, token_type, image_grids, video_grids, valid)
        if compression and compression.oim and compression.oim.llm_positions == "source":
            position_ids = self.family.source_positions(position_ids, [
                [(s.cells, s.grid, (t, h // self.unit, w // self.unit)) for s, (t, h, w) in zip(spans[b], r.visual.source_grids)]
                for b, r in enumerate(requests)])
        position_ids = position_ids.to(device)
        positions = position_ids.reshape(-1, *ids.shape)  # (axes, B, L) whatever the family's shape: one axis for 1D RoPE
        next_position = (positions.amax(dim=(0, 2)).ceil().long() + 1).cpu()  # text positions stay whole numbers
        cos, sin = self.lm.rotary_emb(hidden, position_ids)
        source = torch.where(valid & ~absent, torch.arange(width).expand_as(ids), -1)
        if absent.any():  # cells the encoder dropped: their placeholders never enter a layer
            hidden, cos, sin, source, valid = _pad_rows([gather((hidden[b], cos[b], sin[b], source[b]), source[b] >= 0) for b in range(len(requests))])
        valid = valid.to(device)

        pruner = get(compression.method).pruner(compression, self.num_layers) if compression else None
        cache = DynamicCache(config=self.config.get_text_config())
        layer_valid, visual_per_layer = [], [[] for _ in requests]
        attention = None
        for i, layer in enumerate(self.lm.layers):
            if pruner and i in pruner.layers:
                inputs = LayerInputs(i, hidden, cos, sin, source, spans, positions, lambda k: cache.layers[k].keys,
                                     self.lm.norm, self._rotary(position_ids.shape[:-2]), attention)
                hidden, cos, sin, source, valid = _pad_rows(pruner.prune(inputs))
            for b in range(len(requests)):
                visual_per_layer[b].append(sum(len(members(source[b], s)) for s in spans[b]))
            layer_valid.append(valid)
            layer_in = hidden
            hidden = layer(hidden, position_embeddings=(cos, sin), past_key_values=cache, use_cache=True,
                           attention_mask=self._mask(valid, hidden.shape[1], dtype))
            if pruner and i == pruner.attention_layer:
                attention = self.family.last_query_attention(layer, layer_in, cos, sin, cache.layers[i].keys, valid)
        logits = self.model.lm_head(self.lm.norm(hidden[:, -1]))
        return PrefillState(cache, layer_valid, next_position, logits.float(), visual_per_layer)

    def _rotary(self, axes: torch.Size) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The rotary embedding taking (axes, B, L) positions, for a family whose position ids have
        leading dims `axes` (none for 1D RoPE)."""
        return lambda x, pos: self.lm.rotary_emb(x, pos.reshape(*axes, *pos.shape[1:]))

    @torch.no_grad()
    def decode_step(self, state: PrefillState, tokens: Tensor) -> Tensor:
        """Feed one token per row through the cached layers; returns (B, V) logits."""
        device = self.lm.embed_tokens.weight.device
        hidden = self.lm.embed_tokens(tokens.to(device)[:, None])
        position_ids = self.family.decode_position_ids(state.next_position.to(device))
        cos, sin = self.lm.rotary_emb(hidden, position_ids)
        for i, layer in enumerate(self.lm.layers):
            v = state.layer_valid[i]
            state.layer_valid[i] = torch.cat([v, v.new_ones(len(v), 1)], dim=1)
            hidden = layer(
                hidden,
                attention_mask=self._mask(state.layer_valid[i], 1, hidden.dtype),
                position_embeddings=(cos, sin),
                past_key_values=state.cache,
                use_cache=True,
            )
        state.next_position += 1
        return self.model.lm_head(self.lm.norm(hidden[:, -1])).float()

    def generate(
        self,
        requests: list[Request],
        compression: CompressionConfig | None,
        max_new_tokens: int,
        on_step: Callable[[list[list[int]], Tensor], bool] | None = None,
    ) -> Generation:
        """Greedy decoding; returned token ids stop before EOS (EOS excluded).

        `on_step(new, logits)` gets each step's new token ids per request (none once a request has hit
        EOS) and the (B, V) logits they were chosen from; returning False stops generation (a
        cancelled or expired RPC)."""
        eos = self.config.text_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        t0 = time.perf_counter()
        state = self.prefill(requests, compression)
        state.logits.cpu()  # waits for the device, so prefill_ms is not just kernel-launch time on GPU
        t1 = time.perf_counter()
        out: list[list[int]] = [[] for _ in requests]
        done = [False] * len(requests)
        logits = state.logits
        for step in range(max_new_tokens):
            next_tokens = logits.argmax(-1).cpu()
            accepted: list[list[int]] = []
            for b, tok in enumerate(next_tokens.tolist()):
                done[b] = done[b] or tok in eos
                accepted.append([] if done[b] else [tok])
                out[b] += accepted[b]
            stopped = on_step is not None and on_step(accepted, logits) is False
            if all(done) or step == max_new_tokens - 1 or stopped:
                break
            logits = self.decode_step(state, next_tokens)
        t2 = time.perf_counter()
        return Generation(out, state.visual_per_layer, (t1 - t0) * 1e3, (t2 - t1) * 1e3)


def _pad_rows(rows: list[tuple[Tensor, Tensor, Tensor, Tensor]]):
    """Left-pad per-row (hidden, cos, sin, source) to the longest row; returns them with `valid`."""
    width = max(len(r[3]) for r in rows)
    hidden, cos, sin = (torch.zeros(len(rows), width, r.shape[-1], dtype=r.dtype, device=r.device) for r in rows[0][:3])
    source = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, (h, c, s, src) in enumerate(rows):
        n = len(src)
        if n:
            hidden[b, width - n :], cos[b, width - n :], sin[b, width - n :], source[b, width - n :] = h, c, s, src
    return hidden, cos, sin, source, (source >= 0).to(hidden.device)
