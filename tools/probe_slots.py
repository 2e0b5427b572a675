"""How well does a checkpoint's vision tower tell digits apart, and where does it fail? On held-out "read" scenes
(validation seed, the datasets' renderer), the checkpoint's own char-slot heads (--char-slots) are scored per
labelled slot, split two ways:
- by the target's ambiguity: a token is clean when every digit with >= 25% of its ink there is assigned to it and
  each digit assigned to it has >= 75% of its ink there (token_labels gives a digit to the token with most ink);
- by where the digit's ink centre falls in its merged token's cell, per axis: near a patch's centre, near the patch
  boundary inside the token (the digit split between two patches, its target unambiguous), or near a token boundary.
It also reads each scene's number off the heads (the predicted characters in left-to-right slot order) and counts
the numbers read exactly: a measure that does not depend on the slot rule, so --char-bands towers compare with others.
With --char-bands the ambiguity split is left out (a band target names each digit once, by its ink centre).

    python tools/probe_slots.py runs/s36/vis128/ckpt.pt --rope-theta 100 --text-layers 6 --char-slots 4 --max-pixels 200704 --n 300
Takes the training flags that shape the model; needs a checkpoint trained with --aux-weight and --char-slots.
"""
import argparse
from collections import Counter

import numpy as np
import torch

import luvc_common.research.train as T
from luvc_common.engine.media import Media
from luvc_common.research.evaluate import VALIDATION_SEED
from luvc_common.research.synthvqa import Look, QuestionSpec, evidence, make_example, render


def where(centre: float, patch: int, merge: int) -> str:
    """Which part of its token's cell a coordinate (resized pixels) is in."""
    within_token = centre % (patch * merge)
    if abs(centre % patch - patch / 2) < patch / 4:
        return "patch centre"
    return "token boundary" if min(within_token, patch * merge - within_token) < patch / 4 else "inner patch boundary"


def read_out(predicted: np.ndarray, cols: int, bands: bool) -> str:
    """The characters the slot heads put in a scene (tokens x slots of class ids), left to right: by column, then by
    band and row (bands), or by row and slot (reading-order slots)."""
    t, j = np.nonzero(predicted)
    keys = [(c, b, r) if bands else (c, r, b) for c, r, b in zip(t % cols, t // cols, j)]
    return "".join(T.CHARS[predicted[t[i], j[i]] - 1] for i in sorted(range(len(keys)), key=keys.__getitem__))


def main() -> None:
    parser = T.add_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=300, help="held-out read scenes")
    args = parser.parse_args()
    if not args.char_slots:
        parser.error("--char-slots: the checkpoint's number of char slots is needed")
    torch.set_num_threads(args.threads)
    processor = T.image_processor(args.max_pixels)
    model = T.build_model(args, T._tokenizer()).eval()
    probe = T.VisionProbe(model, args.aux_balanced, args.cell_layer, args.char_slots)
    state = torch.load(args.checkpoint, weights_only=False, map_location="cpu")
    model.load_state_dict(state["model"])
    probe.load_state_dict(state["probe"])
    patch, merge = processor.patch_size, processor.merge_size
    right, total, shares, exact = Counter(), Counter(), [], 0
    for i in range(args.n):
        scene = make_example(VALIDATION_SEED, i, "read").scene
        pixels, grid = T.FAMILY.patchify([Media("image", [render(scene)])], processor)
        with torch.no_grad():
            T.vision_forward(model, {"pixel_values": pixels, "image_grid_thw": grid}, torch.device("cpu"))
            logits = probe.head(probe.tokens.float()).split(probe.sizes, dim=-1)[probe.kinds:]
        predicted = torch.stack([lg.argmax(-1) for lg in logits], 1).numpy()
        target = T.token_labels(scene, Look(), grid, merge, patch, args.char_slots, args.char_bands)[:, probe.kinds:].numpy()
        cell, n, _ = T.token_cells(scene, grid, merge)
        cols = int(grid[0, 2]) // merge
        exact += read_out(predicted, cols, args.char_bands) == scene.text
        masks = evidence(scene, QuestionSpec("read"), Look())
        ink = np.stack([np.bincount(cell[m], minlength=n) for m in masks]).astype(float)
        share = ink / np.maximum(ink.sum(1, keepdims=True), 1)
        places = T.band_places(masks, scene, grid, merge, args.char_slots) if args.char_bands else T.reading_places(masks, cell, n)
        owner = np.array([-1 if p is None else p[0] for p in places])
        scale = {"x": int(grid[0, 2]) * patch / scene.width, "y": int(grid[0, 1]) * patch / scene.height}
        for d, place in enumerate(places):
            if place is None or place[1] >= args.char_slots:
                continue
            t, slot = place
            shares.append(share[d, t])
            clean = set(np.flatnonzero(share[:, t] >= 0.25)) == set(np.flatnonzero(owner == t)) and share[owner == t, t].min() >= 0.75
            ys, xs = np.nonzero(masks[d])
            hit = int(predicted[t, slot] == target[t, slot])
            for key in ("all", *([] if args.char_bands else ["clean" if clean else "ambiguous"]),
                        f"x: {where(xs.mean() * scale['x'], patch, merge)}", f"y: {where(ys.mean() * scale['y'], patch, merge)}"):
                right[key], total[key] = right[key] + hit, total[key] + 1
    shares = np.array(shares)
    print(f"{len(shares)} digits in {args.n} read scenes; the share of a digit's ink in the token it is assigned to: "
          f"median {np.median(shares):.2f}, under 0.6 for {(shares < 0.6).mean():.2f}, under 0.75 for {(shares < 0.75).mean():.2f}")
    for key in sorted(total, key=lambda k: (k != "all", k)):
        print(f"slots right, {key}: {right[key]}/{total[key]} = {right[key] / total[key]:.3f}")
    print(f"numbers read exactly off the heads: {exact}/{args.n} = {exact / args.n:.3f}")


if __name__ == "__main__":
    main()
