"""Theoretical LLM prefill FLOPs from the number of tokens entering each decoder layer.

A multiply-add counts as 2 FLOPs. Per decoder layer with n tokens entering it:
  linear     2 n (d (q + 2 kv) + q d + 3 d m)   q/k/v/o projections and the gated MLP (gate, up, down)
  attention  2 * 2 n^2 q                        QK^T and AV over all n x n pairs (no causal halving)
where d = hidden_size, m = intermediate_size, q = num_attention_heads * head_dim and
kv = num_key_value_heads * head_dim. Biases, norms, rotary embeddings and softmax are left out.
The lm_head runs on the last prompt token only: 2 d vocab_size, included (it is the same for every
method, so it only pulls ratios slightly towards 1). Tokens are counted after each layer's pruning,
so padding never counts.
"""
from __future__ import annotations


from luvc_common.compression.grid import grid_tokens
from luvc_common.compression.methods import get


def _dims(text_config) -> tuple[int, int, int, int]:
    """(hidden, intermediate, query width, key/value width) of a HF text config."""
    c = text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.hidden_size, c.intermediate_size, c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim


def layer_flops(n: int, text_config) -> float:
    """FLOPs of one decoder layer on n tokens."""
    d, m, q, kv = _dims(text_config)
    return 2.0 * n * (d * (q + 2 * kv) + q * d + 3 * d * m) + 4.0 * n * n * q


def prefill_flops(tokens_per_layer: list[int], text_config) -> float:
    """FLOPs of one prefill: every decoder layer on its own token count, plus lm_head on one token."""
    return sum(layer_flops(n, text_config) for n in tokens_per_layer) + 2.0 * text_config.hidden_size * text_config.vocab_size


def flops_ratio(base_tokens_per_layer: list[int], method_tokens_per_layer: list[int], text_config) -> float:
    """How many times fewer FLOPs the method's prefill needs than the base's (> 1: cheaper)."""
    return prefill_flops(base_tokens_per_layer, text_config) / prefill_flops(method_tokens_per_layer, text_config)


def uncompressed_tokens_per_layer(text_tokens: int, source_grids: list[tuple[int, int, int]], num_layers: int, unit: int = 2) -> list[int]:
    """Tokens entering each layer without compression: text plus t*h*w / unit^2 visual tokens per item."""
    return [text_tokens + sum(grid_tokens(g, unit) for g in source_grids)] * num_layers


def matched_keep_ratio(target_ratio: float, text_tokens: int, visual_tokens: int, text_config, num_layers: int,
                       start_layer: int = 0) -> float:
    """The keep ratio k at which a method that keeps k * visual_tokens from layer `start_layer` on
    (0: before the LLM, i.e. in the encoder) has the theoretical FLOPs ratio `target_ratio`; 1.0 when
    even keeping everything is cheap enough, the smallest ratio keeping one token when nothing is."""
    base = [text_tokens + visual_tokens] * num_layers

    def ratio(k: float) -> float:
        kept = text_tokens + max(1, round(k * visual_tokens))
        return flops_ratio(base, base[:start_layer] + [kept] * (num_layers - start_layer), text_config)

    lo, hi = 1.0 / max(visual_tokens, 1), 1.0
    if ratio(hi) >= target_ratio or ratio(lo) <= target_ratio:
        return hi if ratio(hi) >= target_ratio else lo
    for _ in range(40):  # ratio(k) falls as k grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) > target_ratio else (lo, mid)
    return hi


def with_matched_budget(cfg, target_ratio: float, text_tokens: int, visual_tokens: int, text_config, num_layers: int):
    """A baseline CompressionConfig with the keep ratio that gives it the theoretical FLOPs ratio
    target_ratio on a prompt of text_tokens + visual_tokens (pool: the nearest power of 1/2)."""
    method = get(cfg.method)
    start = method.first_pruned_layer(cfg, num_layers)
    return method.budget(cfg, matched_keep_ratio(target_ratio, round(text_tokens), round(visual_tokens), text_config, num_layers, start))
