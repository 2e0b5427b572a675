"""Draw a SynthVQA split with a second, independent renderer (matplotlib instead of Pillow) and write it as
SynthVQA-format JSONL, to measure how much a model depends on our renderer's look.

Usage: python tools/render_alt.py OUT_DIR [--n 600] [--seed 3000]
then:  luvc eval --model DIR --data OUT_DIR/data.jsonl

The scenes, questions and answers are `make_example(seed, i)`'s; only the drawing differs: matplotlib's
antialiased patches, its "tab" palette (gold for yellow), a serif or STIX font for digits and bar letters,
thinner baseline, and a background from a different light range. Layouts, object sizes and font sizes are
still this project's, so this measures the look, not the scene distribution.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Circle, Polygon, Rectangle
from tqdm import tqdm

from luvc_common.research.synthvqa import make_example

PALETTE = {"red": "tab:red", "green": "tab:green", "blue": "tab:blue", "yellow": "gold", "purple": "tab:purple",
           "orange": "tab:orange"}
FONTS = ("DejaVu Serif", "STIXGeneral")


def draw(scene, rng: np.random.Generator, path: Path) -> None:
    fig = plt.figure(figsize=(scene.width / 72, scene.height / 72), dpi=72)  # 1 pt = 1 px
    ax = fig.add_axes((0, 0, 1, 1), xlim=(0, scene.width), ylim=(scene.height, 0))
    ax.axis("off")
    fig.set_facecolor(rng.uniform(0.9, 1.0, 3))
    for o in scene.objects:
        x0, y0, s = o.cx - o.size, o.cy - o.size, 2 * o.size
        ax.add_patch({"circle": Circle((o.cx, o.cy), o.size),
                      "square": Rectangle((x0, y0), s, s),
                      "triangle": Polygon([(o.cx, y0), (x0 + s, y0 + s), (x0, y0 + s)])}[o.shape])
        ax.patches[-1].set_color(PALETTE[o.color])
    font = dict(family=FONTS[int(rng.integers(len(FONTS)))], size=scene.font_size, color="black")
    if scene.text:
        ax.text(*scene.text_xy, scene.text, va="top", ha="left", **font)
    for b in scene.bars:
        ax.add_patch(Rectangle((b.x0, scene.baseline - b.height), b.x1 - b.x0, b.height, color=PALETTE[b.color]))
        ax.text((b.x0 + b.x1) / 2, scene.baseline + 4, b.label, va="top", ha="center", **font)
    if scene.bars:
        ax.plot((scene.bars[0].x0 - 4, scene.bars[-1].x1 + 4), (scene.baseline,) * 2, color="0.3", linewidth=1)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--seed", type=int, default=3000, help="SynthVQA split (3000: test, 2000: validation)")
    args = p.parse_args()
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    with open(out / "data.jsonl", "w") as f:
        for i in tqdm(range(args.n), desc="render"):
            ex = make_example(args.seed, i)
            image = f"images/{i:06d}.png"
            draw(ex.scene, rng, out / image)
            f.write(json.dumps({"image": image, "question": ex.question, "answer": ex.answer, "task": ex.task}) + "\n")


if __name__ == "__main__":
    main()
