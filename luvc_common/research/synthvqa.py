"""SynthVQA: a deterministic procedural visual-QA generator.

Each example is a plain scene description (dataclasses) that is rendered with PIL; the answer is
computed from the description alone by `answer_for`, so it can be checked without looking at pixels.
Example `index` of `seed` is the same whatever the dataset size. Six task families, balanced:
color, shape, count, position, read (a 3-5 digit number) and chart (tallest of 3-6 labelled bars).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TASKS = ("color", "shape", "count", "position", "read", "chart")
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
          "yellow": (230, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"),
             ("bottom left", "bottom", "bottom right"))
BAR_LABELS = "ABCDEF"
ANSWERS: dict[str, tuple[str, ...] | None] = {
    "color": tuple(COLORS), "shape": SHAPES, "count": tuple(str(i) for i in range(10)),
    "position": tuple(p for row in POSITIONS for p in row), "read": None, "chart": tuple(BAR_LABELS)}
"""Allowed answers per task; None for "read", whose answer is any 3-5 digit number."""

SIDES = tuple(range(224, 673, 28))
READ_DIGITS = (3, 5)
"""Shortest and longest number of a "read" scene."""
MAX_READ_DIGITS = 18
"""The longest number a training curriculum may ask for (an int64 draw)."""
STRIP_HEIGHTS = tuple(range(56, 225, 28))
"""Heights a training "read" scene may be cut to (a strip of text: the same digits for a fraction of the pixels)."""
_SIDE_W = np.array([3.0 if s <= 448 else 1.0 for s in SIDES])  # mostly modest sizes: a tiny model trains on CPU
_SIDE_P = _SIDE_W / _SIDE_W.sum()
GAP = 4  # minimum free pixels between objects and to the image border


@dataclass(frozen=True)
class Shape:
    """A filled shape inside the square of half-side `size` centred on (cx, cy)."""
    shape: str
    color: str
    cx: int
    cy: int
    size: int


@dataclass(frozen=True)
class Bar:
    label: str
    x0: int
    x1: int
    height: int  # pixels above the scene's baseline
    color: str


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[Shape, ...] = ()
    text: str = ""  # black text with its top-left corner at text_xy
    text_xy: tuple[int, int] = (0, 0)
    font_size: int = 0  # of the text, or of the bar labels
    bars: tuple[Bar, ...] = ()
    baseline: int = 0  # y of the bars' bottom edge


@dataclass(frozen=True)
class QuestionSpec:
    """What is asked: the task plus the colour and/or shape that name the referred objects."""
    task: str
    color: str | None = None
    shape: str | None = None


@dataclass(frozen=True)
class Example:
    scene: Scene
    spec: QuestionSpec
    question: str
    answer: str
    task: str


class _Crowded(Exception):
    """No free spot was found for an object; the scene is drawn again."""


@lru_cache(maxsize=None)
def _font(size: int, path: str | None = None) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


@dataclass(frozen=True)
class Look:
    """How a scene is drawn. Look() is the datasets' renderer; random_look() varies it for training only."""
    palette: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(COLORS))
    """RGB of each colour name."""
    font: str | None = None
    """TTF file of the digits and bar labels; None: Pillow's default font."""


ALT_COLORS = {"red": (235, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 235),
              "yellow": (245, 230, 0), "purple": (128, 0, 128), "orange": (255, 160, 0)}
"""A second, CSS-like rendering of each colour name, so that training does not see only COLORS."""
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def random_look(rng: np.random.Generator, jitter: int = 20) -> Look:
    """A training-time look: each colour is COLORS or ALT_COLORS, jittered by up to +-jitter per channel, and the
    font is Pillow's default or one of the DejaVu TTFs when the machine has them."""
    palette = {}
    for name in COLORS:
        base = np.array((COLORS, ALT_COLORS)[int(rng.integers(2))][name])
        palette[name] = tuple(int(v) for v in np.clip(base + rng.integers(-jitter, jitter + 1, size=3), 0, 255))
    fonts = [None, *sorted(str(f) for f in FONT_DIR.glob("DejaVuSans*.ttf"))]
    return Look(palette, fonts[int(rng.integers(len(fonts)))])


def jitter_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene (same answers) with a new light background, objects shrunk by up to 20% about their
    centres (so they stay apart and in their cells) and the text size changed by up to 2 px."""
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    objects = tuple(replace(o, size=max(4, int(round(o.size * rng.uniform(0.8, 1.0))))) for o in scene.objects)
    font_size = scene.font_size + int(rng.integers(-2, 3)) if scene.font_size else 0
    return replace(scene, background=background, objects=objects, font_size=font_size)


def question_text(spec: QuestionSpec) -> str:
    if spec.task == "color":
        return f"What color is the {spec.shape}?"
    if spec.task == "shape":
        return f"What shape is the {spec.color} object?"
    if spec.task == "count":
        return f"How many {spec.color + ' ' if spec.color else ''}{spec.shape}s are there?"
    if spec.task == "position":
        return f"Where is the {spec.color} {spec.shape}?"
    return {"read": "What number is written in the image?", "chart": "Which bar is the tallest?"}[spec.task]


def answer_for(scene: Scene, spec: QuestionSpec) -> str:
    """The answer to `spec` computed from the scene description; ValueError if the reference is ambiguous."""
    if spec.task == "read":
        return scene.text
    if spec.task == "chart":
        return max(scene.bars, key=lambda b: b.height).label
    matches = [o for o in scene.objects if spec.color in (None, o.color) and spec.shape in (None, o.shape)]
    if spec.task == "count":
        return str(len(matches))
    if len(matches) != 1:
        raise ValueError(f"{spec} refers to {len(matches)} objects, expected exactly one")
    obj = matches[0]
    if spec.task == "color":
        return obj.color
    if spec.task == "shape":
        return obj.shape
    return POSITIONS[3 * obj.cy // scene.height][3 * obj.cx // scene.width]


def scene_questions(scene: Scene) -> list[QuestionSpec]:
    """The DESIGN-6 questions the scene answers unambiguously; counts of each shape, and of each colour-shape
    pair present (not of the many absent pairs), when the answer is 0-9."""
    if scene.text:
        return [QuestionSpec("read")]
    if scene.bars:
        return [QuestionSpec("chart")]
    def n(color: str | None, shape: str | None) -> int:
        return sum(color in (None, o.color) and shape in (None, o.shape) for o in scene.objects)
    specs = [QuestionSpec("color", shape=s) for s in SHAPES if n(None, s) == 1]
    specs += [QuestionSpec("shape", color=c) for c in COLORS if n(c, None) == 1]
    specs += [QuestionSpec("position", c, s) for c in COLORS for s in SHAPES if n(c, s) == 1]
    specs += [QuestionSpec("count", None, s) for s in SHAPES if n(None, s) <= 9]
    specs += [QuestionSpec("count", c, s) for c in COLORS for s in SHAPES if 1 <= n(c, s) <= 9]
    return specs


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _kinds(rng: np.random.Generator, k: int, ok: Callable[[str, str], bool]) -> list[tuple[str, str]]:
    """k random (color, shape) pairs among those accepted by ok."""
    pool = [(c, s) for c in COLORS for s in SHAPES if ok(c, s)]
    return [pool[int(i)] for i in rng.integers(len(pool), size=k)]


def _place(rng: np.random.Generator, scene: Scene, kinds: list[tuple[str, str]], sizes: tuple[int, int],
           box: tuple[int, int, int, int] | None = None) -> Scene:
    """Adds non-overlapping shapes of half-size in [sizes) at random centres (inside box when given)."""
    objects = list(scene.objects)
    for color, shape in kinds:
        s = int(rng.integers(*sizes))
        x0, y0, x1, y1 = box or (s + GAP, s + GAP, scene.width - s - GAP, scene.height - s - GAP)
        for _ in range(200):
            cx, cy = int(rng.integers(x0, x1 + 1)), int(rng.integers(y0, y1 + 1))
            if all(max(abs(cx - o.cx), abs(cy - o.cy)) > s + o.size + GAP for o in objects):
                break
        else:
            raise _Crowded
        objects.append(Shape(shape, color, cx, cy, s))
    return Scene(scene.width, scene.height, scene.background, tuple(objects))


def _build(rng: np.random.Generator, task: str, max_distractors: int, side: int | None,
           read_digits: tuple[int, int], read_height: int | None) -> tuple[Scene, QuestionSpec]:
    w, h = (side, side) if side else (int(rng.choice(SIDES, p=_SIDE_P)) for _ in range(2))
    if task == "read" and read_height is not None:
        h = read_height
    scene = Scene(w, h, tuple(int(v) for v in rng.integers(225, 256, size=3)))
    color, shape = _pick(rng, tuple(COLORS)), _pick(rng, SHAPES)
    n_distractors = int(rng.integers(0, max_distractors + 1))
    if task == "color":  # the only object of its shape
        kinds = [(color, shape)] + _kinds(rng, n_distractors, lambda c, s: s != shape)
        return _place(rng, scene, kinds, (14, 31)), QuestionSpec(task, shape=shape)
    if task == "shape":  # the only object of its colour
        kinds = [(color, shape)] + _kinds(rng, n_distractors, lambda c, s: c != color)
        return _place(rng, scene, kinds, (14, 31)), QuestionSpec(task, color=color)
    if task == "count":  # small objects, so that token compression can hurt
        ask_color = bool(rng.random() < 0.5)
        asked = lambda c, s: s == shape and (c == color or not ask_color)
        targets = _kinds(rng, int(rng.integers(0, 10)), asked)
        kinds = targets + _kinds(rng, int(rng.integers(0, max_distractors + 2)), lambda c, s: not asked(c, s))
        return _place(rng, scene, kinds, (6, 12)), QuestionSpec(task, color if ask_color else None, shape)
    if task == "position":  # centre well inside one of the 3x3 cells
        row, col, s = int(rng.integers(3)), int(rng.integers(3)), int(rng.integers(12, 21))
        mx, my = max(0.15 * w / 3, s + GAP), max(0.15 * h / 3, s + GAP)
        box = (int(np.ceil(col * w / 3 + mx)), int(np.ceil(row * h / 3 + my)),
               int((col + 1) * w / 3 - mx), int((row + 1) * h / 3 - my))
        scene = _place(rng, scene, [(color, shape)], (s, s + 1), box)
        kinds = _kinds(rng, n_distractors, lambda c, sh: (c, sh) != (color, shape))
        return _place(rng, scene, kinds, (12, 21)), QuestionSpec(task, color, shape)
    if task == "read":  # small but legible black digits
        digits = int(rng.integers(read_digits[0], read_digits[1] + 1))
        text, size = str(int(rng.integers(10 ** (digits - 1), 10 ** digits))), int(rng.integers(14, 23))
        while _font(size).getbbox(text)[2] > 0.75 * w - 16:  # a long training line leaves room for any look's font
            text = text[:-1]
        _, _, right, bottom = _font(size).getbbox(text)
        xy = (int(rng.integers(8, w - right - 8)), int(rng.integers(8, h - bottom - 8)))
        return Scene(w, h, scene.background, text=text, text_xy=xy, font_size=size), QuestionSpec(task)
    if task == "chart":  # distinct heights, the tallest over 1.25x the next
        winner = int(rng.integers(len(BAR_LABELS)))  # uniform over the letters, then enough bars to hold it
        n, size, margin = int(rng.integers(max(3, winner + 1), 7)), int(rng.integers(14, 21)), 16
        baseline = h - margin - size - 6
        tallest = int(rng.integers(int(0.7 * (baseline - margin)), baseline - margin + 1))
        pool = np.arange(int(0.15 * tallest), int(0.8 * tallest))
        others = iter(int(v) for v in rng.choice(pool, n - 1, replace=False))
        slot = (w - 2 * margin) / n
        bars = tuple(Bar(BAR_LABELS[i], int(margin + (i + 0.2) * slot), int(margin + (i + 0.8) * slot),
                         tallest if i == winner else next(others), _pick(rng, tuple(COLORS))) for i in range(n))
        return Scene(w, h, scene.background, font_size=size, bars=bars, baseline=baseline), QuestionSpec(task)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def check_read_digits(read_digits: tuple[int, int]) -> None:
    if not 1 <= read_digits[0] <= read_digits[1] <= MAX_READ_DIGITS:
        raise ValueError(f"read_digits={read_digits}: expected 1 <= low <= high <= {MAX_READ_DIGITS}")


def digit_range(value: str) -> tuple[int, int]:
    """An argparse type for `read_digits`: "LOW,HIGH"."""
    try:
        low, high = (int(v) for v in value.split(","))
        check_read_digits((low, high))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 1 <= LOW <= HIGH <= {MAX_READ_DIGITS}, got {value!r}") from None
    return low, high


def make_example(seed: int, index: int, task: str | None = None, max_distractors: int = 3, side: int | None = None,
                 read_digits: tuple[int, int] = READ_DIGITS, read_height: int | None = None) -> Example:
    """Example `index` of the dataset `seed` (task defaults to TASKS[index % 6]); no files written.

    For training curricula: max_distractors < 3 makes easier object scenes, `side` fixes the image size (a
    multiple of 28 in 224..672), and a longer `read_digits` range (at most MAX_READ_DIGITS, cut to the image's
    width) puts more digits in each "read" scene, which `read_height` (one of STRIP_HEIGHTS) cuts to a strip; the
    datasets use 3, the varied sizes, READ_DIGITS and full-height read scenes."""
    task = task or TASKS[index % len(TASKS)]
    if side is not None and side not in SIDES:
        raise ValueError(f"side={side}: expected a multiple of 28 in {SIDES[0]}..{SIDES[-1]}")
    if not 0 <= max_distractors <= 3:
        raise ValueError(f"max_distractors={max_distractors}: expected 0..3")
    check_read_digits(read_digits)
    if read_height is not None and read_height not in STRIP_HEIGHTS:
        raise ValueError(f"read_height={read_height}: expected a multiple of 28 in {STRIP_HEIGHTS[0]}..{STRIP_HEIGHTS[-1]}")
    rng = np.random.Generator(np.random.PCG64([seed, index]))
    for _ in range(50):
        try:
            scene, spec = _build(rng, task, max_distractors, side, read_digits, read_height)
            return Example(scene, spec, question_text(spec), answer_for(scene, spec), task)
        except _Crowded:
            continue
    raise RuntimeError(f"could not lay out example {index} of seed {seed}")


def _draw_shape(draw: ImageDraw.ImageDraw, o: Shape, fill) -> None:
    x0, y0, x1, y1 = o.cx - o.size, o.cy - o.size, o.cx + o.size, o.cy + o.size
    if o.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(o.cx, y0), (x1, y1), (x0, y1)], fill=fill)


def _text_xy(scene: Scene, font) -> tuple[int, int]:
    """Where the text goes: scene.text_xy, moved inside the image if this font draws the text wider or taller."""
    _, _, right, bottom = font.getbbox(scene.text)
    x, y = scene.text_xy
    return max(0, min(x, scene.width - right - 2)), max(0, min(y, scene.height - bottom - 2))


def render(scene: Scene, look: Look = Look()) -> Image.Image:
    """Draws the scene as an RGB image (in `look`; the datasets use the default)."""
    img = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o, look.palette[o.color])
    font = _font(scene.font_size, look.font) if scene.font_size else None
    if scene.text:
        draw.text(_text_xy(scene, font), scene.text, fill=(0, 0, 0), font=font)
    for b in scene.bars:
        draw.rectangle(_bar_box(scene, b), fill=look.palette[b.color])
        _draw_label(draw, scene, font, b, (0, 0, 0))
    if scene.bars:
        x0, x1 = scene.bars[0].x0 - 4, scene.bars[-1].x1 + 4
        draw.line((x0, scene.baseline, x1, scene.baseline), fill=(60, 60, 60), width=2)
    return img


CHARS = "0123456789" + BAR_LABELS
LABEL_MAPS = {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES), "char": 1 + len(CHARS), "tallest": 2}
"""Per-pixel label maps of a scene and their class counts (class 0 is the background)."""


def label_maps(scene: Scene, look: Look = Look()) -> dict[str, np.ndarray]:
    """Per-pixel class maps (H x W uint8) of what render(scene, look) draws: the colour (1-6, objects and bars)
    and shape (1-3) of each object, which character (1-16: digits, then bar letters) inks each pixel, and
    the tallest bar with its label (1)."""
    maps = {name: Image.new("L", (scene.width, scene.height), 0) for name in LABEL_MAPS}
    draw = {name: ImageDraw.Draw(m) for name, m in maps.items()}
    colors = list(COLORS)
    for o in scene.objects:
        _draw_shape(draw["color"], o, 1 + colors.index(o.color))
        _draw_shape(draw["shape"], o, 1 + SHAPES.index(o.shape))
    font = _font(scene.font_size, look.font) if scene.font_size else None
    for i, ch in enumerate(scene.text):
        _draw_char(draw["char"], scene, font, i, 1 + CHARS.index(ch))
    tallest = max(scene.bars, key=lambda b: b.height) if scene.bars else None
    for b in scene.bars:
        draw["color"].rectangle(_bar_box(scene, b), fill=1 + colors.index(b.color))
        _draw_label(draw["char"], scene, font, b, 1 + CHARS.index(b.label))
        if b is tallest:
            draw["tallest"].rectangle(_bar_box(scene, b), fill=1)
            _draw_label(draw["tallest"], scene, font, b, 1)
    return {name: np.asarray(m) for name, m in maps.items()}


def _bar_box(scene: Scene, b: Bar) -> tuple[int, int, int, int]:
    return b.x0, scene.baseline - b.height, b.x1, scene.baseline


def _draw_label(draw: ImageDraw.ImageDraw, scene: Scene, font, b: Bar, fill) -> None:
    draw.text(((b.x0 + b.x1) // 2, scene.baseline + 4), b.label, fill=fill, font=font, anchor="mt")


def _draw_char(draw: ImageDraw.ImageDraw, scene: Scene, font, i: int, fill) -> None:
    """Character i of the scene's text, where render draws it."""
    x, y = _text_xy(scene, font)
    draw.text((x + font.getlength(scene.text[:i]), y), scene.text[i], fill=fill, font=font)


def evidence(scene: Scene, spec: QuestionSpec, look: Look = Look()) -> list[np.ndarray]:
    """Where the answer to `spec` is drawn, as H x W bool masks: one per digit for "read" (in reading order), else
    one for the whole answer (the referred objects, or the tallest bar and its label); [] for a count of 0."""
    font = _font(scene.font_size, look.font) if scene.font_size else None
    def mask(paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
        m = Image.new("1", (scene.width, scene.height), 0)
        paint(ImageDraw.Draw(m))
        return np.asarray(m)
    if spec.task == "read":
        return [mask(lambda d, i=i: _draw_char(d, scene, font, i, 1)) for i in range(len(scene.text))]
    if spec.task == "chart":
        tallest = max(scene.bars, key=lambda b: b.height)
        def bar_and_label(d: ImageDraw.ImageDraw) -> None:
            d.rectangle(_bar_box(scene, tallest), fill=1)
            _draw_label(d, scene, font, tallest, 1)
        return [mask(bar_and_label)]
    matches = [o for o in scene.objects if spec.color in (None, o.color) and spec.shape in (None, o.shape)]
    return [mask(lambda d: [_draw_shape(d, o, 1) for o in matches])] if matches else []


def write_dataset(out_dir: str | Path, n: int, seed: int, progress: bool = False,
                  draw: Callable[[Scene], Image.Image] = render, task: str | None = None, side: int | None = None,
                  read_digits: tuple[int, int] = READ_DIGITS) -> Path:
    """Writes out_dir/data.jsonl and out_dir/images/NNNNNN.png for n examples, each scene drawn by `draw` (another
    renderer can draw the same split); returns the jsonl path. `task`, `side` and `read_digits` narrow the set as in
    make_example, e.g. to measure reading by number length and image size."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    indices = range(n)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="synthvqa")
    path = out_dir / "data.jsonl"
    with open(path, "w") as f:
        for i in indices:
            ex = make_example(seed, i, task, side=side, read_digits=read_digits)
            image = f"images/{i:06d}.png"
            draw(ex.scene).save(out_dir / image)
            record = {"image": image, "question": ex.question, "answer": ex.answer, "task": ex.task}
            f.write(json.dumps(record) + "\n")
    return path


def normalize_answer(s: str) -> str:
    """Lowercase, trim spaces and drop one final period, for exact-match scoring."""
    s = s.strip().lower()
    return s[:-1].strip() if s.endswith(".") else s


def chance(task: str) -> float:
    """Exact-match accuracy of the best blind guess: uniform over the task's answers; for "read", a guess that
    knows how many digits the number has (evenly 3, 4 or 5) and that it has no leading zero."""
    if task == "read":
        lengths = range(READ_DIGITS[0], READ_DIGITS[1] + 1)
        return sum(1 / (9 * 10 ** (n - 1)) for n in lengths) / len(lengths)
    return 1 / len(ANSWERS[task])


def lower_bound(correct: int, n: int, confidence: float = 0.95) -> float:
    """Clopper-Pearson lower end of the two-sided `confidence` interval of a binomial rate seen as correct / n."""
    if correct == 0:
        return 0.0

    def at_least(p: float) -> float:  # P(X >= correct), rising with p
        return 1 - sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(correct))

    tail, low, high = (1 - confidence) / 2, 0.0, correct / n
    for _ in range(60):  # bisect for the p where it equals the tail
        mid = (low + high) / 2
        low, high = (mid, high) if at_least(mid) < tail else (low, mid)
    return low


def load_jsonl(path: str | Path) -> list[dict]:
    """Reads a SynthVQA-style jsonl; image paths are resolved relative to the file."""
    path = Path(path)
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
        missing = [k for k in ("image", "question", "answer", "task") if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
        records.append({**rec, "image": str(path.parent / rec["image"])})
    return records
