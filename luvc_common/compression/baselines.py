"""Baseline visual-token reduction methods: pure tensor functions, no model or I/O.

Each function decides which tokens of ONE media item survive (or how they merge); the model
glue in luvc_common/models applies the decision where the method acts:

- ToMe (Bolya et al., ICLR 2023, facebookresearch/ToMe): bipartite soft matching between ViT blocks,
  size-weighted merging, proportional attention (log size added to the attention logits).
- VisionZip (Yang et al., CVPR 2025, dvlab-research/VisionZip): dominant tokens by attention
  received, plus contextual tokens that merge the rest by similarity, before the projector.
- FastV (Chen et al., ECCV 2024, pkunlp-icler/FastV): after LLM layer K-1, keep the visual tokens the
  last prompt token attends to most (needs that layer's attention weights).
- DART (Wen et al., 2025, ZichenWen1/DART): at LLM layer K, pick pivot tokens by key L1 norm and keep
  the visual tokens least similar (cosine) to the pivots: duplication, not importance.
- pooling and uniform random pruning.

Qwen-VL towers hand the projector groups of unit x unit patch tokens (one LLM token each), so the
vision-side methods treat such a group ("unit") as the token: it is matched, kept or merged as a
whole, sub-token by sub-token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def keep_count(n: int, keep_ratio: float) -> int:
    """Tokens kept out of n at keep_ratio: at least one when n > 0."""
    return min(n, max(1, round(keep_ratio * n))) if n else 0


def tome_schedule(n: int, keep: int, num_blocks: int) -> list[int]:
    """Tokens merged away after each of num_blocks blocks so that `keep` of n remain: ToMe's constant
    r per block, raised where needed because one bipartite step merges at most half of the tokens
    (so a later block could not catch up). A budget below n / 2**num_blocks is out of reach."""
    sched = []
    for left in range(num_blocks, 0, -1):
        r = min(n // 2, max(-(-(n - keep) // left), n - keep * 2 ** (left - 1)))
        sched.append(r)
        n -= r
    return sched


def bipartite_soft_matching(metric: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """ToMe's matching on (n, c) features: alternate tokens into sets A (even) and B (odd), link each
    A token to its most similar (cosine) B token and take the r most similar links.

    Returns (src, dst): indices into the n tokens; src[i] (in A) merges into dst[i] (in B)."""
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[::2], metric[1::2]
    best, best_b = (a @ b.T).max(dim=-1)
    src_a = best.argsort(descending=True)[:r]
    return 2 * src_a, 2 * best_b[src_a] + 1


def merge_into(x: Tensor, sizes: Tensor, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Size-weighted merge of tokens `src` into `dst`. x: (n, ...) features, sizes: (n,) patches per
    token. Returns (features of the survivors, their sizes, their indices into the n tokens)."""
    w = sizes.float().reshape(-1, *([1] * (x.dim() - 1)))
    total = (x.float() * w).index_add(0, dst, x[src].float() * w[src])
    new_sizes = sizes.float().index_add(0, dst, sizes[src].float())
    keep = torch.ones(len(x), dtype=torch.bool, device=x.device)
    keep[src] = False
    idx = keep.nonzero().flatten()
    return (total[idx] / new_sizes[idx].reshape(-1, *([1] * (x.dim() - 1)))).to(x.dtype), new_sizes[idx], idx


def visionzip_merge(x: Tensor, saliency: Tensor, metric: Tensor, dominant: int, contextual: int) -> tuple[Tensor, Tensor]:
    """VisionZip on one item's n tokens. x: (n, ...) features; saliency: (n,) attention received;
    metric: (n, c) similarity features. The `dominant` most salient tokens are kept as they are; of the
    rest, `contextual` evenly spaced targets each absorb the remaining tokens most similar to them
    (target + mean of its assigned tokens, as in the official code).

    Returns (features of the kept tokens in index order, their indices into the n tokens)."""
    n = len(x)
    dom = saliency.topk(min(dominant, n)).indices
    rest = torch.ones(n, dtype=torch.bool, device=x.device)
    rest[dom] = False
    rest = rest.nonzero().flatten()
    contextual = min(contextual, len(rest))
    if contextual == 0:
        dom = dom.sort().values
        return x[dom], dom
    targets = rest[torch.linspace(0, len(rest) - 1, contextual, device=x.device).round().long().unique()]
    others = rest[~torch.isin(rest, targets)]
    m = F.normalize(metric.float(), dim=-1)
    assign = (m[others] @ m[targets].T).argmax(dim=-1)
    flat = x.reshape(n, -1).float()
    summed = flat.new_zeros(len(targets), flat.shape[1]).index_add(0, assign, flat[others])
    counts = torch.bincount(assign, minlength=len(targets)).clamp_min(1).float()[:, None]
    merged = x.clone()
    merged[targets] = (flat[targets] + summed / counts).reshape(-1, *x.shape[1:]).to(x.dtype)
    kept = torch.cat([dom, targets]).sort().values
    return merged[kept], kept


def fastv_keep(last_token_attention: Tensor, keep: int) -> Tensor:
    """FastV: indices (sorted) of the `keep` tokens with the largest attention from the last prompt
    token, averaged over heads. last_token_attention: (heads, n)."""
    return last_token_attention.float().mean(0).topk(keep).indices.sort().values


def dart_keep(image_keys: Tensor, text_keys: Tensor, image_hidden: Tensor, text_hidden: Tensor,
              keep: int, image_pivots: int, text_pivots: int) -> Tensor:
    """DART on one item: pivots are the image and text tokens with the largest key L1 norm; then each
    pivot in turn claims its share of the remaining budget: the free image tokens least cosine-similar
    to it. The image pivots are kept and count towards `keep`. keys: (n, c) / (m, c); hidden: (n, d) / (m, d).
    Returns sorted indices into the n image tokens (`keep` of them)."""
    n = len(image_keys)
    img_piv = image_keys.float().abs().sum(-1).topk(min(image_pivots, keep, n)).indices
    txt_piv = text_keys.float().abs().sum(-1).topk(min(text_pivots, len(text_keys))).indices
    pivots = torch.cat([image_hidden[img_piv], text_hidden[txt_piv]]).float()
    budget, n_piv = max(0, keep - len(img_piv)), max(1, len(pivots))
    chosen = torch.zeros(n, dtype=torch.bool, device=image_keys.device)
    chosen[img_piv] = True
    hidden = F.normalize(image_hidden.float(), dim=-1)
    for i, p in enumerate(F.normalize(pivots, dim=-1)):
        free = (~chosen).nonzero().flatten()
        take = min(budget // n_piv + (i < budget % n_piv), len(free))
        chosen[free[(hidden[free] @ p).topk(take, largest=False).indices]] = True
    return chosen.nonzero().flatten()


def random_keep(n: int, keep: int, seed: int) -> Tensor:
    """Uniform random subset of `keep` of n indices (sorted), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:keep].sort().values
