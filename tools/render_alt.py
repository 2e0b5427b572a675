"""Draw a SynthVQA split with a second, independent renderer (matplotlib instead of Pillow) and write it as
SynthVQA-format JSONL, to measure how much a model depends on our renderer's look.

Usage: python tools/render_alt.py OUT_DIR [--n 600] [--seed 3000]
then:  luvc eval --model DIR --data OUT_DIR/data.jsonl

The scenes, questions and answers are `make_example(seed, i)`'s; only the drawing differs: matplotlib's
antialiased patches, its "tab" palette (gold for yellow), a serif or STIX font for digits and bar letters,
a thinner baseline, and a background from a different light range. Layouts, object sizes and font sizes are
still this project's, so this measures the look, not the scene distribution.
"""
import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Circle, Polygon, Rectangle
from PIL import Image

from luvc_common.research.synthvqa import Scene, write_dataset

PALETTE = {"red": "tab:red", "green": "tab:green", "blue": "tab:blue", "yellow": "gold", "purple": "tab:purple",
           "orange": "tab:orange"}
FONTS = ("DejaVu Serif", "STIXGeneral")


def draw(scene: Scene) -> Image.Image:
    rng = np.random.default_rng([scene.width, scene.height, *scene.background])  # background and font: per scene
    fig = plt.figure(figsize=(scene.width / 72, scene.height / 72), dpi=72)  # 1 pt = 1 px
    ax = fig.add_axes((0, 0, 1, 1), xlim=(0, scene.width), ylim=(scene.height, 0))
    ax.axis("off")
    fig.set_facecolor(rng.uniform(0.9, 1.0, 3))
    for o in scene.objects:
        x0, y0, s = o.cx - o.size, o.cy - o.size, 2 * o.size
        patch = {"circle": Circle((o.cx, o.cy), o.size), "square": Rectangle((x0, y0), s, s),
                 "triangle": Polygon([(o.cx, y0), (x0 + s, y0 + s), (x0, y0 + s)])}[o.shape]
        ax.add_patch(patch).set_color(PALETTE[o.color])
    font = dict(family=FONTS[int(rng.integers(len(FONTS)))], size=scene.font_size, color="black")
    if scene.text:
        ax.text(*scene.text_xy, scene.text, va="top", ha="left", **font)
    for b in scene.bars:
        ax.add_patch(Rectangle((b.x0, scene.baseline - b.height), b.x1 - b.x0, b.height, color=PALETTE[b.color]))
        ax.text((b.x0 + b.x1) / 2, scene.baseline + 4, b.label, va="top", ha="center", **font)
    if scene.bars:
        ax.plot((scene.bars[0].x0 - 4, scene.bars[-1].x1 + 4), (scene.baseline,) * 2, color="0.3", linewidth=1)
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    plt.close(fig)
    return image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--seed", type=int, default=3000, help="SynthVQA split (3000: test, 2000: validation)")
    args = p.parse_args()
    print(write_dataset(args.out, args.n, args.seed, progress=True, draw=draw))


if __name__ == "__main__":
    main()
