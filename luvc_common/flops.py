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
    return [text_tokens + sum(t * h * w // unit**2 for t, h, w in source_grids)] * num_layers
