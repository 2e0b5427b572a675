"""Train a tiny Qwen2-VL from scratch on SynthVQA, on CPU.

Examples are generated on the fly: batch `step` holds make_example(seed, step * batch_size + j),
so the data order is a pure function of the step and resuming needs no data-loader state.
The LR schedule (warm-up, then cosine) follows progress = max(step / steps, elapsed / minutes), so
a run on a busy shared CPU still decays fully before its time budget ends; on an idle machine the
step budget binds and the run is a pure function of the seed. Checkpoints (model, optimizer,
schedule, step, RNG) are written atomically to OUT/ckpt.pt, the loss log to OUT/log.jsonl;
`--export DIR` writes a standard HF model directory (bf16 safetensors).

    python -m luvc_common.research.train --out runs/train --steps 4000 --minutes 31 --export models/luvc-tiny-qwen2vl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from luvc_common.compression.grid import grid_tokens
from luvc_common.errors import ConfigError
from luvc_common.research.evaluate import TEST_SEED, VALIDATION_SEED, int_at_least, positive_int
from luvc_common.engine.media import Media
from luvc_common.models.family import get_family
from luvc_common.models.loading import resolve_device
from luvc_common.models.prompt import build_prompt_ids, chat_turn
from luvc_common.models.tiny import save_model
from luvc_common.research.synthvqa import (CHARS, COLORS, LABEL_MAPS, READ_DIGITS, SHAPES, SIDES, STRIP_HEIGHTS,
                                           TASKS, Example, Look, QuestionSpec, Scene, answer_for, digit_range, evidence, jitter_scene,
                                           label_maps, make_example, question_text, random_look, render, scene_questions)
from luvc_common.models.tokenizer import build_tokenizer

FAMILY = get_family("qwen2_vl")
"""The family trained: the default model is a tiny Qwen2-VL."""


def _tasks(value: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in value.split(","))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; expected some of {list(TASKS)}")
    return tasks


def _layers(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {value!r}") from None


def _section(value: str) -> tuple[int, int, int]:
    try:
        section = tuple(int(v) for v in value.split(","))
    except ValueError:
        section = ()
    if len(section) != 3 or min(section) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers T,H,W, got {value!r}")
    return section


def _share(value: str) -> float:
    if not 0 < (v := float(value)) <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return v


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default="runs/train", help="run directory: checkpoint and loss log")
    p.add_argument("--steps", type=positive_int, default=3000, help="optimizer steps (the LR schedule spans them)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-frac", type=float, default=0.05, help="final LR as a fraction of --lr (cosine decay)")
    p.add_argument("--warmup", type=int_at_least(0), default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1000, help="SynthVQA training seed (and torch init seed)")
    p.add_argument("--questions", type=positive_int, default=1, help="questions per training image (extra chat turns of the same task about the same scene)")
    p.add_argument("--max-distractors", type=int, choices=range(4), default=3, help="most distractor objects in an object scene")
    p.add_argument("--curriculum", type=int_at_least(0), default=0, help="steps over which --max-distractors ramps up from 0 (0: no ramp)")
    p.add_argument("--tasks", type=_tasks, default=TASKS, help="comma-separated task families to train on")
    p.add_argument("--side", type=int, choices=SIDES, default=None, metavar="S",
                   help="every training image S x S (a multiple of 28, 224-672); default: SynthVQA's varied sizes")
    p.add_argument("--read-digits", type=digit_range, default=READ_DIGITS, metavar="LOW,HIGH",
                   help="digits of a training \"read\" scene's number (cut to the image width); a long line gives the tower "
                        "many digits per image to learn from; validation keeps SynthVQA's 3,5")
    p.add_argument("--read-height", type=int, choices=STRIP_HEIGHTS, default=None, metavar="H",
                   help="draw every training \"read\" scene H pixels tall (a multiple of 28, 56-224): a strip of text gives the "
                        "tower the same digits for a fraction of the compute; validation keeps full scenes")
    p.add_argument("--strip-share", type=_share, default=1.0, metavar="F",
                   help="with --read-height: cut only this share of the training read scenes (drawn per example), so the "
                        "LLM reads many strips per minute yet still meets the full scenes that the splits ask about")
    p.add_argument("--max-pixels", type=int, default=336 * 336, help="image processor max_pixels (visual tokens per image)")
    p.add_argument("--low-pixels", type=positive_int, default=None, metavar="P",
                   help="dynamic resolution: each step draws its images' max_pixels log-uniformly from P to --max-pixels, as VLMs "
                        "train on many sizes (so fewer tokens per image are not new to the model); validation and export keep --max-pixels")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rope-theta", type=float, default=10.0,
                   help="LLM rotary base; small, so that M-RoPE turns visibly per grid step (1e4 leaves columns indistinguishable)")
    p.add_argument("--mrope-section", type=_section, default=(8, 12, 12), metavar="T,H,W",
                   help="rotary frequencies of the temporal, height and width axes (sum: head_dim / 2)")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the dense per-visual-token loss (training only; the head is not exported; 0: off)")
    p.add_argument("--pointer-weight", type=float, default=0.0,
                   help="weight of the attention-pointer loss (training only: head 0 of --pointer-layers is taught to look "
                        "where each answer is drawn; 0: off)")
    p.add_argument("--pointer-layers", type=_layers, default=(1, 2), metavar="L,L", help="LLM layers whose head 0 the pointer loss teaches")
    p.add_argument("--question-weight", type=float, default=0.0,
                   help="weight of the question loss (training only: at the position that predicts each answer, the output "
                        "of --question-layer learns which colour and shape the question names; 0: off)")
    p.add_argument("--question-layer", type=int, default=0, help="LLM layer whose output the question loss teaches")
    p.add_argument("--aux-balanced", action="store_true",
                   help="weigh each dense label kind's background and labelled tokens equally (objects are few tokens)")
    p.add_argument("--char-slots", type=int_at_least(0), default=0,
                   help="with --aux-weight: per visual token also learn the first S characters of the text inked mostly in it, in reading order")
    p.add_argument("--char-bands", action="store_true",
                   help="with --char-slots S: slot j of a token names the character whose ink centre lies in the j-th of S "
                        "vertical bands of its cell, instead of the j-th character inked mostly there (a misjudged digit "
                        "then costs its own slot only, not a shift of every later one)")
    p.add_argument("--char-weight", type=float, default=1.0,
                   help="with --aux-weight: weight of the character kinds (the majority character and the char slots) in the "
                        "dense loss's mean over label kinds; above 1 spends more of it on the tower's digit recognition")
    p.add_argument("--vision-only", action="store_true",
                   help="with --aux-weight: train only the vision tower on the dense visual-token loss (no LLM forward, "
                        "~2x faster per image); validation then reports the dense heads' held-out accuracy")
    p.add_argument("--cell-layer", type=int, default=None,
                   help="also teach which third of the image each visual token is in, from the output of this LLM layer "
                        "(training only, like --aux-weight, whose weight it shares)")
    p.add_argument("--augment", action="store_true", help="vary colours, background, object and text sizes and font (training only)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt when it exists")
    p.add_argument("--init", default=None,
                   help="warm start (fresh optimizer and schedule): model weights from another run's ckpt.pt, or from an "
                        "exported model directory such as models/luvc-tiny-qwen2vl-wip (bf16 weights, read as fp32); a "
                        "shallower LLM or tower than --text-layers / --vision-depth grows by identity layers on top; from a "
                        "ckpt.pt without --init-vision, also the training heads (--aux-weight's, --question-weight's) it "
                        "trained in the same shapes, so a next stage does not restart them from random")
    p.add_argument("--init-vision", default=None,
                   help="warm start the vision tower and its merger from this ckpt.pt or model directory instead of --init's "
                        "(the rest from --init, or fresh): e.g. a vision-only run of another --vision-dim with a trained LLM; "
                        "--hidden must be PATH's, since the merger writes the LLM's width")
    p.add_argument("--export", default=None, help="write the final HF model directory here")
    p.add_argument("--minutes", type=float, default=None, help="training time budget over all resumes; the LR decays to it, then stop, save, export")
    p.add_argument("--ckpt-minutes", type=float, default=5.0, help="checkpoint period")
    p.add_argument("--eval-every", type=int_at_least(0), default=250, help="validation period in steps (0: never)")
    p.add_argument("--eval-n", type=positive_int, default=120, help=f"validation examples (seed {VALIDATION_SEED})")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", help='"cpu", "cuda", "cuda:N"; auto: cuda when available (bf16 autocast there)')
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bf16 autocast on CPU too, as on CUDA (fp32 weights and optimizer state either way): training steps "
                        "ran 1.7x faster on the AVX512-BF16 EPYC cores of docs/training.md's machine, 22x slower on an AVX2-only one "
                        "(emulated bf16: a warning says so)")
    p.add_argument("--workers", type=int_at_least(0), default=0, help="data-loader processes building batches ahead (0: in the training loop)")
    return p


MIN_PIXELS = 112 * 112
TOKEN_PIXELS = 28 * 28
"""Image pixels per LLM visual token: a 2 x 2 merge of 14-pixel patches."""


@lru_cache(maxsize=None)
def image_processor(max_pixels: int):
    return FAMILY.image_processor(MIN_PIXELS, max_pixels)


def pixels_at(args: argparse.Namespace, step: int) -> int:
    """The max_pixels of training step `step`'s images: --max-pixels, or with --low-pixels a log-uniform draw
    from [--low-pixels, --max-pixels], rounded down to whole 28 x 28 visual tokens (few distinct processors)."""
    if args.low_pixels is None:
        return args.max_pixels
    u = np.random.default_rng([args.seed, step]).random()
    return max(args.low_pixels, int(args.low_pixels * (args.max_pixels / args.low_pixels) ** u) // TOKEN_PIXELS * TOKEN_PIXELS)


def build_model(args: argparse.Namespace, tokenizer):
    config = FAMILY.tiny_config(tokenizer, text_layers=args.text_layers, vision_depth=args.vision_depth, hidden=args.hidden,
                                vision_dim=args.vision_dim, init_range=0.02, rope_theta=args.rope_theta,
                                mrope_section=args.mrope_section)
    torch.manual_seed(args.seed)
    return FAMILY.model_class(config)


class VisionProbe(torch.nn.Module):
    """Training-only linear heads on the visual tokens (caught by forward hooks): per token entering the LLM (the patch
    merger's output), the classes of token_labels; with cell_layer, per visual token leaving that LLM layer, which
    third of the image (3 x 3 cells) it lies in. Not part of the model, so never exported.

    balanced: each label kind's loss is the mean of its loss on unlabelled (class 0) tokens and on labelled ones, so
    that the background, most of every image, does not drown out what the objects are.
    char_slots: heads for token_labels' reading-order characters; their mean loss counts as one label kind.
    char_weight: the character kinds' (majority character, char slots) weight in the mean over kinds; the others weigh 1."""

    def __init__(self, model, balanced: bool = False, cell_layer: int | None = None, char_slots: int = 0, char_weight: float = 1.0):
        super().__init__()
        self.sizes, self.balanced = [*LABEL_MAPS.values(), 2, *[LABEL_MAPS["char"]] * char_slots], balanced
        self.char_weight = char_weight
        self.kinds = len(LABEL_MAPS) + 1
        hidden = model.config.text_config.hidden_size
        self.head = torch.nn.Linear(hidden, sum(self.sizes))
        self.tokens: Tensor | None = None
        FAMILY.projector(FAMILY.vision(model)).register_forward_hook(self._keep)
        self.cell_head = None
        if cell_layer is not None:
            self.cell_head, self.hidden = torch.nn.Linear(hidden, 9), None
            decoder_layers(model, (cell_layer,), "--cell-layer")[0].register_forward_hook(self._keep_hidden)

    def _keep(self, module, inputs, output: Tensor) -> None:
        self.tokens = output

    def _keep_hidden(self, module, inputs, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output

    def _cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        if not self.balanced:
            return F.cross_entropy(logits, labels)
        token_loss = F.cross_entropy(logits, labels, reduction="none")
        parts = [token_loss[m].mean() for m in (labels == 0, labels != 0) if m.any()]
        return torch.stack(parts).mean()

    def loss(self, labels: Tensor, image_tokens: Tensor | None = None, grid: Tensor | None = None) -> Tensor:
        """Mean cross-entropy over the label kinds, for the tokens of the last forward; the cell head needs where
        the image tokens are in the batch (bool, batch x length) and the images' grids."""
        logits = self.head(self.tokens.float()).split(self.sizes, dim=-1)
        losses = [self._cross_entropy(lg, labels[:, i].to(lg.device)) for i, lg in enumerate(logits)]
        if len(losses) > self.kinds:
            losses[self.kinds:] = [torch.stack(losses[self.kinds:]).mean()]
        for i in (list(LABEL_MAPS).index("char"), *range(self.kinds, len(losses))):
            losses[i] = self.char_weight * losses[i]
        if self.cell_head is not None:
            visual = self.hidden[image_tokens.to(self.hidden.device)].float()
            losses.append(F.cross_entropy(self.cell_head(visual), grid_thirds(grid).to(visual.device)))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def hits(self, labels: Tensor) -> dict[str, tuple[int, int]]:
        """Per label kind (the char slots together as "slots"), the head's right answers and the number of labelled
        (class > 0) tokens of the last forward."""
        names = [*LABEL_MAPS, "centre", *["slots"] * (len(self.sizes) - self.kinds)]
        out: dict[str, tuple[int, int]] = {}
        for name, lg, y in zip(names, self.head(self.tokens.float()).split(self.sizes, dim=-1), labels.T.to(self.tokens.device)):
            right, total = out.get(name, (0, 0))
            out[name] = (right + int((lg.argmax(-1) == y)[y > 0].sum()), total + int((y > 0).sum()))
        return out


def decoder_layers(model, indices: tuple[int, ...], flag: str) -> list[torch.nn.Module]:
    """The LLM decoder layers at `indices`; ConfigError naming `flag` when one is out of range."""
    decoder = FAMILY.language(model).layers
    if not all(-len(decoder) <= i < len(decoder) for i in indices):
        raise ConfigError(f"{flag} {','.join(map(str, indices))}: the LLM has {len(decoder)} layers")
    return [decoder[i] for i in indices]


def grid_thirds(grid: Tensor, merge: int = 2) -> Tensor:
    """Per merged visual token of each image (row-major, images in order), the 3 x 3 cell of the image its centre
    lies in (row * 3 + column): the answer of synthvqa's position task for an object there."""
    out = []
    for t, h, w in grid.tolist():
        rows, cols = h // merge, w // merge
        r = (3 * (2 * torch.arange(rows) + 1)) // (2 * rows)
        c = (3 * (2 * torch.arange(cols) + 1)) // (2 * cols)
        out.append((3 * r[:, None] + c[None, :]).flatten().repeat(t))
    return torch.cat(out)


class AttentionPointer:
    """Training-only loss that teaches head 0 of some LLM layers where to look: at each position that predicts an
    answer token, minus the log of the head's attention mass on the visual tokens where that answer is drawn
    (synthvqa.evidence: the referred objects, the digit being read, the tallest bar). It switches the LLM to eager
    attention, the kind that returns attention weights; nothing is added to the model, so the export is unchanged."""

    def __init__(self, model, layers: tuple[int, ...]):
        model.config.text_config._attn_implementation = "eager"
        self.weights: dict[int, Tensor] = {}
        for i, layer in zip(layers, decoder_layers(model, layers, "--pointer-layers")):
            layer.self_attn.register_forward_hook(lambda module, inputs, output, i=i: self.weights.__setitem__(i, output[1]))

    def loss(self, rows: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
        """rows, queries (P,): batch row and position of each supervised query; keys (P, L): its evidence tokens."""
        mass = [(w[rows.to(w.device), 0, queries.to(w.device)] * keys.to(w.device)).sum(-1) for w in self.weights.values()]
        return -(torch.stack(mass) + 1e-6).log().mean()  # + eps, not a clamp: no mass is too small to get a gradient


class QuestionProbe(torch.nn.Module):
    """Training-only linear heads that teach an LLM layer's output, at the position that predicts a turn's first
    answer token, which colour and which shape the question names (class 0: none named). Attention from there can
    only pick the object asked about once that position knows what was asked; on the fifteenth session's weights the
    asked shape was barely readable there (docs/training.md), and heads looked at every object alike. Not exported."""

    def __init__(self, model, layer: int):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.colour, self.shape = torch.nn.Linear(hidden, 1 + len(COLORS)), torch.nn.Linear(hidden, 1 + len(SHAPES))
        self.hidden: Tensor | None = None
        decoder_layers(model, (layer,), "--question-layer")[0].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output

    def loss(self, rows: Tensor, queries: Tensor, labels: Tensor) -> Tensor:
        """rows, queries (Q,): batch row and position of each turn's first answer prediction; labels (Q, 2): the
        named colour and shape classes."""
        h = self.hidden[rows.to(self.hidden.device), queries.to(self.hidden.device)].float()
        h = F.layer_norm(h, h.shape[-1:])  # the residual stream's scale is in the hundreds: raw, it starts at a loss of ~25
        labels = labels.to(h.device)
        return (F.cross_entropy(self.colour(h), labels[:, 0]) + F.cross_entropy(self.shape(h), labels[:, 1])) / 2


def question_labels(spec: QuestionSpec) -> tuple[int, int]:
    """The colour and shape a question names, as QuestionProbe classes (0: not named)."""
    return (1 + list(COLORS).index(spec.color) if spec.color else 0, 1 + SHAPES.index(spec.shape) if spec.shape else 0)


def build_optimizer(model, args: argparse.Namespace, *extra: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over the model's (and extra modules') parameters; no weight decay on biases and norms."""
    params = [p for m in (model, *extra) for p in m.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def extra_questions(ex: Example, k: int, rng: np.random.Generator) -> list[QuestionSpec]:
    """Up to k more questions of ex's own task about other things in its scene, in random order.

    Only the same task: a question names what other tasks answer ("Where is the red square?" names the answer to
    "What color is the square?"), so mixed turns let the model copy answers from the conversation instead of
    looking, and colour and shape never left their answer priors on single questions (docs/training.md)."""
    same = [spec for spec in scene_questions(ex.scene) if spec.task == ex.spec.task and spec != ex.spec]
    return [same[int(i)] for i in rng.permutation(len(same))[:k]]


@dataclass(frozen=True)
class Recipe:
    """What one step's training examples look like; Recipe() is SynthVQA as the splits have it."""

    questions: int = 1
    """Questions per image: the example's own, then further chat turns of its task about the same scene."""
    max_distractors: int = 3
    """Most distractor objects in an object scene."""
    tasks: tuple[str, ...] = TASKS
    """Task families, taken in turn by example index."""
    side: int | None = None
    """Every image side x side; None: SynthVQA's varied sizes."""
    augment: bool = False
    """Draw each scene in a random look (synthvqa.random_look, jitter_scene); the answers do not change."""
    dense: bool = False
    """Also return token_labels, the targets of the VisionProbe."""
    pointer: bool = False
    """Also return the AttentionPointer's targets: per answer token, the visual tokens where it is drawn."""
    char_slots: int = 0
    """With dense: token_labels' reading-order characters per token."""
    question: bool = False
    """Also return the QuestionProbe's targets: per turn, where its first answer is predicted and what it names."""
    read_digits: tuple[int, int] = READ_DIGITS
    """Shortest and longest number of a "read" scene."""
    read_height: int | None = None
    """Height of a "read" scene cut to a strip of text; None: as tall as SynthVQA draws it."""
    strip_share: float = 1.0
    """With read_height: the share of "read" scenes cut (drawn per example index)."""
    char_bands: bool = False
    """With char_slots: the slots are bands of the token's cell (token_labels)."""


def recipe_at(args: argparse.Namespace, step: int) -> Recipe:
    """The recipe of training step `step`: --curriculum ramps max_distractors from 0 to --max-distractors."""
    top = args.max_distractors
    distractors = min(top, (top + 1) * step // args.curriculum) if args.curriculum else top
    return Recipe(args.questions, distractors, args.tasks, args.side, args.augment, args.aux_weight > 0, args.pointer_weight > 0,
                  args.char_slots, args.question_weight > 0, args.read_digits, args.read_height,
                  args.strip_share, args.char_bands)


MIN_COVER = 0.02
"""Fraction of a token's cell a class must cover to label the token (thin digit strokes cover little)."""


def token_cells(scene: Scene, grid: Tensor, merge: int = 2) -> tuple[np.ndarray, int, float]:
    """Per pixel of the scene, the merged visual token whose cell holds it once resized to the grid (row-major);
    the number of tokens; MIN_COVER of a cell in scene pixels."""
    rows, cols = int(grid[0, 1]) // merge, int(grid[0, 2]) // merge
    h, w = scene.height, scene.width
    ys, xs = (((np.arange(n) + 0.5) * cells / n).astype(int) for n, cells in ((h, rows), (w, cols)))
    return ys[:, None] * cols + xs[None, :], rows * cols, MIN_COVER * h * w / (rows * cols)


def covered_tokens(mask: np.ndarray, cell: np.ndarray, n: int, min_pixels: float) -> np.ndarray:
    """The tokens whose cell `mask` covers by MIN_COVER (or, for a tiny mask, the token it covers most)."""
    counts = np.bincount(cell[mask], minlength=n)
    return np.flatnonzero(counts >= max(1, min(min_pixels, counts.max())))


def token_labels(scene: Scene, look: Look, grid: Tensor, merge: int = 2, patch: int = 14, char_slots: int = 0,
                 bands: bool = False) -> Tensor:
    """Targets per merged visual token, in the merger's row-major order: for each of synthvqa.LABEL_MAPS the class
    covering most of the token's (merge * patch)-pixel cell of the resized image (0 when none covers MIN_COVER
    of it), then 1 when an object's centre lies in the cell, then char_slots columns: the characters of the text
    inked mostly in the cell, in reading order (0 past the last). A token holds several small digits; "char" names
    only the one with the most ink, while reading needs all of them and their order. With bands, slot j of a token
    holds the character whose ink centre lies in the j-th of char_slots vertical bands of its cell (band_places)."""
    cell, n, min_pixels = token_cells(scene, grid, merge)
    out = []
    for name, m in label_maps(scene, look).items():
        k = LABEL_MAPS[name]
        counts = np.bincount((cell * k + m).ravel(), minlength=n * k).reshape(n, k)
        counts[:, 0] = 0
        out.append(np.where(counts.max(1) >= min_pixels, counts.argmax(1), 0))
    centre = np.zeros(n, dtype=np.int64)
    centre[[cell[o.cy, o.cx] for o in scene.objects]] = 1
    slots = np.zeros((n, char_slots), dtype=np.int64)
    masks = evidence(scene, QuestionSpec("read"), look) if char_slots else []
    places = band_places(masks, scene, grid, merge, char_slots) if bands else reading_places(masks, cell, n)
    for ch, place in zip(scene.text, places):
        if place is not None and place[1] < char_slots:
            slots[place] = 1 + CHARS.index(ch)
    return torch.from_numpy(np.concatenate([np.stack([*out, centre], 1), slots], 1))


def reading_places(masks: list[np.ndarray], cell: np.ndarray, n: int) -> list[tuple[int, int] | None]:
    """Per character (its ink mask, in reading order), the token holding most of its ink and its place among that
    token's characters (token_labels' char slot); None for a character with no ink."""
    filled, out = np.zeros(n, dtype=np.int64), []
    for mask in masks:
        t = int(np.bincount(cell[mask], minlength=n).argmax()) if mask.any() else None
        out.append(None if t is None else (t, int(filled[t])))
        if t is not None:
            filled[t] += 1
    return out


def band_places(masks: list[np.ndarray], scene: Scene, grid: Tensor, merge: int, bands: int) -> list[tuple[int, int] | None]:
    """Per character (its ink mask), the token whose cell holds its ink centre and which of `bands` equal vertical
    bands of that cell the centre is in; None for a character with no ink."""
    rows, cols = int(grid[0, 1]) // merge, int(grid[0, 2]) // merge
    out = []
    for mask in masks:
        if not mask.any():
            out.append(None)
            continue
        ys, xs = np.nonzero(mask)
        x, y = (xs.mean() + 0.5) * cols / scene.width, (ys.mean() + 0.5) * rows / scene.height
        out.append((int(y) * cols + int(x), min(int((x - int(x)) * bands), bands - 1)))
    return out


def encode_example(seed: int, index: int, tokenizer, processor, recipe: Recipe = Recipe()) -> dict:
    """Prompt + answer ids (labels only on answers and their <|im_end|>), patches and grid of one example.

    The first turn is the example itself, in the serving prompt format; further turns (recipe.questions)
    ask other questions of its task about the same image (extra_questions), so one vision forward trains several answers.
    """
    strip = recipe.read_height if recipe.read_height and np.random.default_rng([seed, index, 3]).random() < recipe.strip_share else None
    ex = make_example(seed, index, recipe.tasks[index % len(recipe.tasks)], recipe.max_distractors, recipe.side, recipe.read_digits, strip)
    scene, look = ex.scene, Look()
    if recipe.augment:
        rng = np.random.Generator(np.random.PCG64([seed, index, 2]))
        scene, look = jitter_scene(scene, rng), random_look(rng)
    pixels, grid = FAMILY.patchify([Media("image", [render(scene, look)])], processor)
    n_tokens = grid_tokens(tuple(grid[0].tolist()), processor.merge_size)
    prompt = build_prompt_ids(tokenizer, FAMILY.chat, ex.question, ["image"], [n_tokens], 1 << 20)
    im_end = tokenizer.convert_tokens_to_ids(FAMILY.chat.turn_end)
    ids, labels = [], []
    turns = [(prompt, ex.spec)]
    rng = np.random.Generator(np.random.PCG64([seed, index, 1]))
    for spec in extra_questions(ex, recipe.questions - 1, rng):
        turn = tokenizer("\n" + chat_turn(FAMILY.chat, question_text(spec)), add_special_tokens=False)["input_ids"]
        turns.append((turn, spec))
    pointers, questions = [], []
    cell, n_cells, min_pixels = token_cells(scene, grid, processor.merge_size)
    first_image = prompt.index(tokenizer.convert_tokens_to_ids(FAMILY.chat.image))
    for prompt_ids, spec in turns:
        answer_ids = tokenizer(answer_for(ex.scene, spec), add_special_tokens=False)["input_ids"]
        if recipe.question:
            questions.append((len(ids) + len(prompt_ids) - 1, *question_labels(spec)))
        if recipe.pointer:
            masks = evidence(scene, spec, look)
            for j in range(len(answer_ids) if masks else 0):  # the query before answer token j looks at its evidence
                tokens = covered_tokens(masks[j] if spec.task == "read" else masks[0], cell, n_cells, min_pixels)
                if tokens.size:
                    pointers.append((len(ids) + len(prompt_ids) - 1 + j, first_image + tokens))
        answer_ids.append(im_end)
        ids += prompt_ids + answer_ids
        labels += [-100] * len(prompt_ids) + answer_ids
    item = dict(ids=ids, labels=labels, pixels=pixels, grid=grid, task=ex.task)
    if recipe.dense:
        item["aux_labels"] = token_labels(scene, look, grid, processor.merge_size, processor.patch_size, recipe.char_slots,
                                          recipe.char_bands)
    if recipe.pointer:
        item["pointers"] = pointers
    if recipe.question:
        item["questions"] = questions
    return item


def collate(items: list[dict], pad_id: int, image_token_id: int) -> dict[str, Tensor]:
    """Right-padded batch for a training forward; patches concatenated in batch order."""
    width = max(len(it["ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(it["ids"]), torch.tensor(it["labels"]), 1
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, mm_token_type_ids=(ids == image_token_id).int(),
                 pixel_values=torch.cat([it["pixels"] for it in items]), image_grid_thw=torch.cat([it["grid"] for it in items]))
    if "aux_labels" in items[0]:
        batch["aux_labels"] = torch.cat([it["aux_labels"] for it in items])
    if "pointers" in items[0]:
        pointers = [(i, query, keys) for i, it in enumerate(items) for query, keys in it["pointers"]]
        batch["pointer_rows"] = torch.tensor([i for i, _, _ in pointers], dtype=torch.long)
        batch["pointer_queries"] = torch.tensor([q for _, q, _ in pointers], dtype=torch.long)
        batch["pointer_keys"] = torch.zeros((len(pointers), width))
        for row, (_, _, keys) in enumerate(pointers):
            batch["pointer_keys"][row, torch.from_numpy(keys)] = 1.0
    if "questions" in items[0]:
        questions = [(i, *q) for i, it in enumerate(items) for q in it["questions"]]
        batch["question_rows"], batch["question_queries"] = (torch.tensor([q[k] for q in questions], dtype=torch.long) for k in (0, 1))
        batch["question_labels"] = torch.tensor([q[2:] for q in questions], dtype=torch.long).reshape(-1, 2)
    return batch


def make_batch(seed: int, indices: range, tokenizer, processor, recipe: Recipe = Recipe()) -> tuple[dict[str, Tensor], list[str]]:
    items = [encode_example(seed, i, tokenizer, processor, recipe) for i in indices]
    ids = tokenizer.convert_tokens_to_ids
    return collate(items, ids(FAMILY.chat.pad), ids(FAMILY.chat.image)), [it["task"] for it in items]


class StepBatches(torch.utils.data.Dataset):
    """Item `step` is that training step's batch: a pure function of the step, so any number of loader
    workers yields the same batches and resuming needs no loader state."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        a = self.args
        return make_batch(a.seed, range(step * a.batch_size, (step + 1) * a.batch_size), _tokenizer(),
                          image_processor(pixels_at(a, step)), recipe_at(a, step))[0]


@lru_cache(maxsize=None)
def _tokenizer():
    return build_tokenizer(FAMILY.chat)


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; on CPU the caller's precision (fp32, or an enclosing CPU autocast: --cpu-bf16)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware; elsewhere CPU autocast emulates it, far slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_autocast(bf16: bool, device: torch.device) -> AbstractContextManager:
    """--cpu-bf16's bf16 autocast around a CPU forward pass (backward runs outside it, as autocast asks)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and device.type == "cpu")


def forward(model, batch: dict[str, Tensor], device: torch.device):
    """The model's output on `batch`, moved to `device`; bf16 autocast on CUDA."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast(device):
        return model(**batch)


@torch.no_grad()
def score(model, batch: dict[str, Tensor], device: torch.device = torch.device("cpu")) -> tuple[Tensor, Tensor, Tensor]:
    """Per example: does greedy decoding reproduce every answer (teacher-forced argmax == labels), the mean loss
    over its answer tokens, and the share of those tokens it gets right given the gold ones before (for read, the
    digits right at their place); the last two show progress while exact match is still at chance."""
    logits = forward(model, {k: v for k, v in batch.items() if k != "labels"}, device).logits[:, :-1].float()
    target = batch["labels"][:, 1:].to(device)
    answer = target != -100
    token_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    right = logits.argmax(-1) == target
    return (right | ~answer).all(1).cpu(), (token_loss.sum(1) / answer.sum(1)).cpu(), ((right & answer).sum(1) / answer.sum(1)).cpu()


@torch.no_grad()
def probe_accuracy(model, probe: VisionProbe, batches: list[dict[str, Tensor]], device: torch.device) -> dict[str, float]:
    """The dense heads' accuracy per label kind on the labelled tokens of held-out batches (vision tower only)."""
    model.eval()
    right, total = Counter(), Counter()
    for batch in batches:
        vision_forward(model, batch, device)
        for name, (r, n) in probe.hits(batch["aux_labels"]).items():
            right[name], total[name] = right[name] + r, total[name] + n
    model.train()
    return {name: right[name] / n for name, n in total.items() if n}


def vision_forward(model, batch: dict[str, Tensor], device: torch.device) -> Tensor:
    """Only the vision tower on `batch`'s images (the VisionProbe's hook catches the merged tokens)."""
    with autocast(device):
        return FAMILY.vision(model)(batch["pixel_values"].to(device), grid_thw=batch["image_grid_thw"].to(device))


def evaluate(model, batches: list[tuple[dict[str, Tensor], list[str]]],
             device: torch.device = torch.device("cpu")) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Exact-match accuracy, mean answer loss and answer-token accuracy (score's three), overall ("all") and per task."""
    model.eval()
    by_task: list[dict[str, list[float]]] = [{}, {}, {}]
    for batch, tasks in batches:
        for task, *values in zip(tasks, *(t.tolist() for t in score(model, batch, device))):
            for table, value in zip(by_task, values):
                table.setdefault(task, []).append(value)
    model.train()
    mean = lambda table: {"all": float(np.mean(sum(table.values(), []))), **{t: float(np.mean(v)) for t, v in table.items()}}
    return tuple(mean(table) for table in by_task)


@dataclass
class Schedule:
    """Linear warm-up over `warmup` steps, then cosine decay to min_frac * lr as progress goes 0 -> 1."""

    lr: float
    steps: int
    warmup: int
    min_frac: float
    seconds: float | None
    """Time budget; None: steps only."""
    elapsed: float = 0.0
    """Training seconds so far, over all resumes."""

    def progress(self, step: int) -> float:
        return max(step / self.steps, self.elapsed / self.seconds if self.seconds is not None else 0.0)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = min(1.0, self.progress(step))
        return self.lr * (self.min_frac + (1 - self.min_frac) * 0.5 * (1 + math.cos(math.pi * t)))


HEADS = {"probe": "--aux-weight", "question": "--question-weight"}
"""Checkpoint key of each training-only module whose weights the optimizer also trains (VisionProbe, QuestionProbe)
-> the flag that adds it."""


def save_checkpoint(path: Path, model, optimizer, schedule: Schedule, step: int, heads: dict[str, torch.nn.Module] | None = None) -> None:
    """Atomic: written to a temporary file, then renamed over the old checkpoint. heads: by HEADS name."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), schedule=asdict(schedule), step=step,
                 **{name: head.state_dict() for name, head in (heads or {}).items()},
                 rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()))
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def initial_weights(path: str | Path, model, parts: tuple[str, ...] = ("text_config", "vision_config"),
                    flag: str = "--init") -> dict[str, Tensor]:
    """Weights for `model` from a run's ckpt.pt or an exported HF model directory, whose architecture (rotary
    settings included, which change no tensor shape) must be the one the run's flags build in the config `parts`,
    but for depth: its LLM and tower may have fewer layers (start_weights grows them)."""
    device = next(model.parameters()).device
    if not Path(path).is_dir():
        return torch.load(path, weights_only=False, map_location=device)["model"]
    exported = FAMILY.model_class.from_pretrained(path, torch_dtype=torch.float32)
    for part in parts:
        want, got = (getattr(m.config, part).to_dict() for m in (model, exported))
        differ = sorted(k for k in want.keys() | got.keys()
                        if not (k == "dtype" or want.get(k) == got.get(k) or _shallower(k, got.get(k), want.get(k))))
        if differ:
            raise ConfigError(f"{flag} {path}: its {part} differs from the one these flags build in "
                              + ", ".join(f"{k} ({got.get(k)} there, {want.get(k)} here)" for k in differ))
    return exported.to(device).state_dict()


def initial_heads(path: str | Path, heads: dict[str, torch.nn.Module]) -> list[str]:
    """Load into `heads` (by HEADS name) those that the run checkpoint `path` saved with the same tensor names and
    shapes; returns their names. An exported model directory holds no heads."""
    if Path(path).is_dir():
        return []
    state = torch.load(path, weights_only=False, map_location="cpu")  # load_state_dict copies onto each head's device
    taken = []
    for name, head in heads.items():
        saved, own = state.get(name), head.state_dict()
        if saved is not None and saved.keys() == own.keys() and all(saved[k].shape == own[k].shape for k in own):
            head.load_state_dict(saved)
            taken.append(name)
    return taken


def _shallower(key: str, got, want) -> bool:
    """Whether config field `key` says `got`'s stack is `want`'s with fewer layers on top."""
    if got is None or want is None:
        return False
    if key in ("depth", "num_hidden_layers"):
        return got < want
    return key == "layer_types" and want[: len(got)] == got  # one entry per LLM layer


def start_weights(args: argparse.Namespace, model) -> dict[str, Tensor]:
    """The model's fresh weights, replaced by --init's (all but the vision tower and merger when --init-vision is
    given) and the tower's and merger's by --init-vision's. A source shallower than the flags' LLM or tower grows:
    the layers it lacks go on top as identities (their residual-stream outputs zeroed), so it computes what it did."""
    weights, tower = model.state_dict(), tuple(f"model.{name}." for name in FAMILY.vision_modules)
    in_tower = lambda k: k.startswith(tower)
    llm_stack = (lambda k: not in_tower(k), LLM_LAYERS, FAMILY.layer_outputs)
    tower_stack = (in_tower, _tower_blocks(tower), FAMILY.block_outputs)
    if args.init:
        parts = ("text_config",) if args.init_vision else ("text_config", "vision_config")
        init = initial_weights(args.init, model, parts)
        init = _fitting(weights, args.init, "--init", {k: v for k, v in init.items() if not (args.init_vision and in_tower(k))})
        for stack in (llm_stack,) if args.init_vision else (llm_stack, tower_stack):
            init |= grown_layers(weights, init.keys(), *stack, f"--init {args.init}")
        weights |= init
    if args.init_vision:
        eyes = initial_weights(args.init_vision, model, ("vision_config",), "--init-vision")
        eyes = _fitting(weights, args.init_vision, "--init-vision", {k: v for k, v in eyes.items() if in_tower(k)})
        weights |= eyes | grown_layers(weights, eyes.keys(), *tower_stack, f"--init-vision {args.init_vision}")
    return weights


LLM_LAYERS = re.compile(r"model\.language_model\.layers\.(\d+)\.(.*)\.[^.]+")
"""A tensor of an LLM decoder layer: (layer, module within it)."""


def _tower_blocks(tower: tuple[str, ...]) -> re.Pattern:
    return re.compile(rf"(?:{'|'.join(map(re.escape, tower))})blocks\.(\d+)\.(.*)\.[^.]+")


def _fitting(weights: dict[str, Tensor], path: str, flag: str, taken: dict[str, Tensor]) -> dict[str, Tensor]:
    """`taken`, when every tensor has its name and shape in `weights`; else a ConfigError naming `flag`."""
    wrong = [f"{k} {tuple(v.shape)} there, {tuple(weights[k].shape) if k in weights else 'none'} here"
             for k, v in taken.items() if k not in weights or v.shape != weights[k].shape]
    if wrong:
        raise ConfigError(f"{flag} {path}: tensors of another shape than these flags build: " + "; ".join(wrong[:3]))
    return taken


def grown_layers(weights: dict[str, Tensor], given: Collection[str], scope: Callable[[str], bool], layer: re.Pattern,
                 outputs: tuple[str, ...], source: str) -> dict[str, Tensor]:
    """The tensors of `weights` in `scope` (a key predicate) that `given` lacks, which must be whole layers
    (`layer` matches a layer tensor's key: index, module) above the given ones; their `outputs` zeroed."""
    depth = 1 + max((int(m[1]) for k in given if (m := layer.fullmatch(k))), default=-1)
    missing = {k: layer.fullmatch(k) for k in weights if scope(k) and k not in given}
    holes = sorted(k for k, m in missing.items() if m is None or int(m[1]) < depth)
    if holes:
        raise ConfigError(f"{source}: lacks tensors of the model these flags build: {', '.join(holes[:3])}")
    for n in {m[1] for m in missing.values()}:
        if not outputs or not set(outputs) <= {m[2] for m in missing.values() if m[1] == n}:
            raise ConfigError(f"{source}: the {FAMILY.model_type} family's outputs {outputs} are not projections of its layer "
                              f"{n} ({', '.join(sorted({m[2] for m in missing.values() if m[1] == n}))})")
    return {k: torch.zeros_like(weights[k]) for k, m in missing.items() if m[2] in outputs}


def drop_later_records(log: Path, step: int) -> None:
    """Keep only the log records up to the checkpoint's step: a run stopped between checkpoints logged steps that its
    resume trains again."""
    if log.exists():
        lines = log.read_text().splitlines(keepends=True)
        log.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


def load_checkpoint(path: Path, model, optimizer, schedule: Schedule, heads: dict[str, torch.nn.Module] | None = None) -> int:
    state = torch.load(path, weights_only=False, map_location=next(model.parameters()).device)
    heads = heads or {}
    saved = {name for name in HEADS if state.get(name) is not None}  # older checkpoints hold probe=None
    if saved != heads.keys():
        named = lambda names: ", ".join(HEADS[n] for n in sorted(names)) or "neither"
        raise ConfigError(f"--resume {path}: the checkpoint was trained with {named(saved)} (of {', '.join(HEADS.values())}), "
                          f"this run with {named(heads)}; resume with the flags it was trained with")
    model.load_state_dict(state["model"])
    for name, head in heads.items():
        head.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    schedule.elapsed = state["schedule"]["elapsed"]
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state["step"]


def export_model(model, tokenizer, max_pixels: int, out: str | Path) -> Path:
    """A standard HF directory: config, bf16 safetensors, tokenizer, preprocessor and generation configs."""
    return save_model(model, tokenizer, image_processor(max_pixels), out)


def train(args: argparse.Namespace) -> dict:
    """Train (or resume), log, checkpoint, and export when done or out of time; returns the last log record."""
    if args.seed in (VALIDATION_SEED, TEST_SEED):
        raise ConfigError(f"--seed {args.seed} is a held-out SynthVQA split (validation {VALIDATION_SEED}, test {TEST_SEED})")
    if args.char_bands and not args.char_slots:
        raise ConfigError("--char-bands: how many bands? give --char-slots")
    if (args.aux_balanced or args.cell_layer is not None or args.char_slots or args.char_weight != 1) and not args.aux_weight:
        raise ConfigError("--aux-balanced, --cell-layer, --char-slots and --char-weight shape the dense visual-token loss: "
                          "they need --aux-weight > 0")
    if args.char_weight < 0:
        raise ConfigError(f"--char-weight {args.char_weight}: must be >= 0")
    if args.vision_only and (not args.aux_weight or args.pointer_weight or args.question_weight or args.cell_layer is not None):
        raise ConfigError("--vision-only trains the vision tower on the dense loss alone: it needs --aux-weight > 0 and "
                          "excludes --pointer-weight, --question-weight and --cell-layer, which teach LLM layers")
    if args.strip_share < 1 and args.read_height is None:
        raise ConfigError(f"--strip-share {args.strip_share} is the share of read scenes cut to --read-height: give --read-height")
    if args.low_pixels is not None and not MIN_PIXELS <= args.low_pixels <= args.max_pixels:
        raise ConfigError(f"--low-pixels {args.low_pixels}: expected {MIN_PIXELS} (the processor's min_pixels) to --max-pixels {args.max_pixels}")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.cpu_bf16 and device.type == "cpu" and not native_cpu_bf16():
        print("warning: --cpu-bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated there, and a step took 22x as long "
              "as in fp32 on an AVX2 EPYC (tools/bench_train_step.py); drop --cpu-bf16 on this machine", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, processor = _tokenizer(), image_processor(args.max_pixels)
    image_token_id = tokenizer.convert_tokens_to_ids(FAMILY.chat.image)
    model = build_model(args, tokenizer).to(device)
    probe = VisionProbe(model, args.aux_balanced, args.cell_layer, args.char_slots, args.char_weight).to(device) if args.aux_weight else None
    pointer = AttentionPointer(model, args.pointer_layers) if args.pointer_weight else None
    question = QuestionProbe(model, args.question_layer).to(device) if args.question_weight else None
    heads = {name: head for name, head in (("probe", probe), ("question", question)) if head is not None}
    optimizer = build_optimizer(model, args, *heads.values())
    schedule = Schedule(args.lr, args.steps, args.warmup, args.min_lr_frac, None if args.minutes is None else 60 * args.minutes)
    ckpt = out / "ckpt.pt"
    step = load_checkpoint(ckpt, model, optimizer, schedule, heads) if args.resume and ckpt.exists() else 0
    if step:
        drop_later_records(out / "log.jsonl", step)
    if step == 0 and (args.init or args.init_vision):
        model.load_state_dict(start_weights(args, model))
        if args.init and heads:
            warm = [] if args.init_vision else initial_heads(args.init, heads)  # heads read the tower: not another's
            print(f"training heads from --init: {', '.join(warm) or 'none'}; fresh: {', '.join(sorted(heads.keys() - set(warm))) or 'none'}",
                  flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters on {device}; starting at step {step}/{args.steps}", flush=True)
    val_recipe = Recipe(dense=True, char_slots=args.char_slots, char_bands=args.char_bands) if args.vision_only else Recipe()
    val = [make_batch(VALIDATION_SEED, range(i, min(i + 24, args.eval_n)), tokenizer, processor, val_recipe)
           for i in range(0, args.eval_n if args.eval_every else 0, 24)]
    model.train()
    last_ckpt = t_prev = time.time()
    record: dict = {}
    loader = torch.utils.data.DataLoader(StepBatches(args), batch_size=None, sampler=range(step, args.steps),
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    with open(out / "log.jsonl", "a") as log, tqdm(total=args.steps, initial=step, dynamic_ncols=True) as bar:
        while schedule.progress(step) < 1:
            t_data = time.time()
            lr = schedule.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            t_model = time.time()
            aux_labels = batch.pop("aux_labels", None)
            pointer_targets = [batch.pop(k, None) for k in ("pointer_rows", "pointer_queries", "pointer_keys")]
            question_targets = [batch.pop(k, None) for k in ("question_rows", "question_queries", "question_labels")]
            with cpu_autocast(args.cpu_bf16, device):
                if args.vision_only:
                    vision_forward(model, batch, device)
                    aux_loss = probe.loss(aux_labels)
                    loss = args.aux_weight * aux_loss
                else:
                    answer_loss = loss = forward(model, batch, device).loss
                    if probe:
                        aux_loss = probe.loss(aux_labels, batch["input_ids"] == image_token_id, batch["image_grid_thw"])
                        loss = loss + args.aux_weight * aux_loss
                if pointer:
                    pointer_loss = pointer.loss(*pointer_targets)
                    loss = loss + args.pointer_weight * pointer_loss
                if question:
                    question_loss = question.loss(*question_targets)
                    loss = loss + args.question_weight * question_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            now = time.time()
            schedule.elapsed, t_prev = schedule.elapsed + now - t_prev, now  # wall time: evaluation and checkpoints count
            trained = aux_loss if args.vision_only else answer_loss  # "loss": the answer loss, or the dense one alone
            record = dict(step=step, loss=round(trained.item(), 4), lr=lr, grad_norm=round(grad_norm.item(), 3),
                          data_s=round(t_model - t_data, 3), model_s=round(now - t_model, 3), elapsed_s=round(schedule.elapsed, 1))
            if args.eval_every and (step % args.eval_every == 0 or schedule.progress(step) >= 1):
                if args.vision_only:
                    with cpu_autocast(args.cpu_bf16, device):
                        val_probe = probe_accuracy(model, probe, [b for b, _ in val], device)
                    record["val_probe"] = {k: round(v, 3) for k, v in val_probe.items()}
                    tqdm.write(f"step {step} val_probe {record['val_probe']}")
                else:
                    with cpu_autocast(args.cpu_bf16, device):
                        acc, val_loss, val_tokens = evaluate(model, val, device)
                    record["val"], record["val_loss"], record["val_tokens"] = (
                        {k: round(v, 3) for k, v in d.items()} for d in (acc, val_loss, val_tokens))
                    tqdm.write(f"step {step} val {record['val']}")
            if probe:
                record["aux_loss"] = round(aux_loss.item(), 4)
            if pointer:
                record["pointer_loss"] = round(pointer_loss.item(), 4)
            if question:
                record["question_loss"] = round(question_loss.item(), 4)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}")
            bar.update()
            done = schedule.progress(step) >= 1
            if now - last_ckpt > 60 * args.ckpt_minutes or done:
                save_checkpoint(ckpt, model, optimizer, schedule, step, heads)
                last_ckpt = time.time()
    print(f"stopped at step {step}/{args.steps} after {schedule.elapsed / 60:.1f} min", flush=True)
    if args.export:
        print(f"exported to {export_model(model, tokenizer, args.max_pixels, args.export)}", flush=True)
    return record


if __name__ == "__main__":
    train(add_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)).parse_args())
