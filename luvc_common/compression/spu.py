"""Spectrum Pruning Unit (SPU): pure tensor functions, no model or I/O.

At a stage, the visual tokens of one media item are laid on their (t, h, w) grid and low-pass
filtered over the spatial axes with an FFT. A token's high-frequency residual is the norm of
(token - its low-pass value) relative to the token's norm. Low-residual tokens are the ones the
low frequencies already describe, so they are pruned; the top-k by residual survive. Nothing reads
attention weights, so every layer keeps its fast attention kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from luvc_common.errors import ConfigError

Grid = tuple[int, int, int]


def lowpass(x: Tensor, cutoff: float, window: str = "ideal") -> Tensor:
    """Low-pass filter (t, h, w, D) features over the h and w axes; returns float32 of the same shape.

    `cutoff` is the kept fraction of the spatial band (frequencies up to cutoff * Nyquist).
    """
    _, h, w, _ = x.shape
    spectrum = torch.fft.rfft2(x.float(), dim=(1, 2))
    fh = torch.fft.fftfreq(h, device=x.device).abs()[:, None]
    fw = torch.fft.rfftfreq(w, device=x.device)[None, :]
    band = cutoff * 0.5
    if window == "ideal":
        gain = ((fh <= band) & (fw <= band)).float()
    else:
        gain = torch.exp(-(fh**2 + fw**2) / (2 * band**2))
    return torch.fft.irfft2(spectrum * gain[None, :, :, None], s=(h, w), dim=(1, 2))


def highfreq_residual(tokens: Tensor, low: Tensor, eps: float = 1e-6) -> Tensor:
    """||token - low|| / ||token|| along the last axis."""
    tokens = tokens.float()
    return (tokens - low).norm(dim=-1) / tokens.norm(dim=-1).clamp_min(eps)


def select(
    tokens: Tensor, cells: Tensor, grid: Grid, keep: int, cutoff: float, window: str, fill: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Choose which of one item's surviving visual tokens to keep.

    tokens: (n, D) hidden states of the survivors; cells: (n,) their flat (t, h, w) raster index;
    fill: (t*h*w, D) low-pass reconstruction of the previous stage, used for the pruned cells
    (None at the first stage, when every cell is present).
    Returns (sorted indices into `tokens` of the `keep` survivors, this stage's (t*h*w, D) low-pass).
    """
    t, h, w = grid
    full = tokens.new_zeros(t * h * w, tokens.shape[-1], dtype=torch.float32) if fill is None else fill.clone()
    full[cells] = tokens.float()
    low = lowpass(full.view(t, h, w, -1), cutoff, window).reshape(t * h * w, -1)
    keep = min(keep, tokens.shape[0])
    if keep == 0:
        return cells.new_zeros(0), low
    scores = highfreq_residual(tokens, low[cells])
    return scores.topk(keep).indices.sort().values, low


def resampled_grid(grid: Grid, keep: int) -> Grid:
    """The (t, h', w') grid with about `keep` tokens and the same aspect ratio (h' <= h, w' <= w)."""
    t, h, w = grid
    scale = (keep / (t * h * w)) ** 0.5
    return t, max(1, min(h, round(h * scale))), max(1, min(w, round(w * scale)))


def spectral_resample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample (t, h, w, D) features onto a (t, h', w') grid by keeping the h' x w' lowest spatial
    frequencies and inverting onto the smaller grid: tokens are fused, not dropped. New token (i, j)
    is the band-limited signal at old coordinates (i * h / h', j * w / w'). float32 out."""
    _, h, w, _ = x.shape
    h2, w2 = size
    rows = torch.cat([torch.arange((h2 + 1) // 2), torch.arange(h - h2 // 2, h)]).to(x.device)
    cols = torch.cat([torch.arange((w2 + 1) // 2), torch.arange(w - w2 // 2, w)]).to(x.device)
    spectrum = torch.fft.fft2(x.float(), dim=(1, 2), norm="forward")[:, rows][:, :, cols]
    return torch.fft.ifft2(spectrum, dim=(1, 2), norm="forward").real


def resampled_positions(positions: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, t, h, w) M-RoPE positions of an item's grid (linear in the row and column index) ->
    (3, t, h', w') float positions where spectral_resample samples: (i * h / h', j * w / w')."""
    _, _, h, w = positions.shape
    pos = positions.float()
    step_h = pos[:, :, 1:2, :1] - pos[:, :, :1, :1] if h > 1 else torch.zeros_like(pos[:, :, :1, :1])
    step_w = pos[:, :, :1, 1:2] - pos[:, :, :1, :1] if w > 1 else torch.zeros_like(pos[:, :, :1, :1])
    rows = (torch.arange(size[0], device=pos.device) * (h / size[0]))[:, None]
    cols = (torch.arange(size[1], device=pos.device) * (w / size[1]))[None, :]
    return pos[:, :, :1, :1] + rows * step_h + cols * step_w


def stage_layers(stages: tuple[tuple[float, float], ...], num_layers: int) -> dict[int, float]:
    """Resolve (relative depth, keep ratio) stages to {decoder layer index: keep ratio}.

    Depths round to layers 1 .. num_layers - 1: layer 0 sees the whole input and the last layer no visual token.
    On a shallow LLM several stages can land on one layer, which then gets the strictest of their ratios, so a
    cascade runs on any LLM of two or more layers and still empties the last one."""
    if num_layers < 2:
        raise ConfigError(f"spu.stages: a {num_layers}-layer LLM has no layer between its first and its last to prune at")
    layers: dict[int, float] = {}
    for depth, ratio in stages:
        layer = min(max(round(depth * num_layers), 1), num_layers - 1)
        layers[layer] = min(ratio, layers.get(layer, 1.0))
    return layers
