"""SynthVQA: determinism, the held-out splits pinned, answer validity, answers recomputed from the scene, rendering, jsonl I/O."""
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from luvc_common.research.synthvqa import (ANSWERS, COLORS, TASKS, chance, lower_bound, QuestionSpec, Scene, Shape, answer_for, load_jsonl,
                                  make_example, normalize_answer, render, scene_questions, write_dataset)

N = 60  # ten examples of each task


def _independent_answer(ex) -> str:
    """Recomputes the answer from the scene description without answer_for."""
    scene, spec = ex.scene, ex.spec
    if ex.task == "read":
        return scene.text
    if ex.task == "chart":
        heights = [b.height for b in scene.bars]
        assert len(set(heights)) == len(heights) and sorted(heights)[-1] > 1.2 * sorted(heights)[-2]
        return scene.bars[int(np.argmax(heights))].label
    matching = [o for o in scene.objects
                if (spec.color is None or o.color == spec.color) and (spec.shape is None or o.shape == spec.shape)]
    if ex.task == "count":
        return str(len(matching))
    assert len(matching) == 1, f"ambiguous reference in {ex.question!r}"
    obj = matching[0]
    if ex.task == "color":
        return obj.color
    if ex.task == "shape":
        return obj.shape
    # position: the centre must be clearly inside one third along each axis
    def third(v: float, size: int) -> int:
        frac = 3 * v / size
        assert abs(frac - round(frac)) > 0.1 or round(frac) in (0, 3), "centre too close to a cell border"
        return 0 if frac < 1 else 1 if frac < 2 else 2
    row, col = third(obj.cy, scene.height), third(obj.cx, scene.width)
    vertical, horizontal = ("top", "", "bottom")[row], ("left", "", "right")[col]
    return f"{vertical} {horizontal}".strip() or "center"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (write_dataset(tmp_path / name, 12, seed) for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    for rec in json.loads("[" + ",".join(a.read_text().splitlines()) + "]"):
        assert (a.parent / rec["image"]).read_bytes() == (b.parent / rec["image"]).read_bytes()
    pixels = lambda root, i: np.asarray(Image.open(root / "images" / f"{i:06d}.png"))
    assert any(pixels(a.parent, i).shape != pixels(c.parent, i).shape
               or (pixels(a.parent, i) != pixels(c.parent, i)).any() for i in range(12))


def test_example_does_not_depend_on_dataset_size(tmp_path):
    small, large = write_dataset(tmp_path / "s", 4, 3), write_dataset(tmp_path / "l", 9, 3)
    assert large.read_text().splitlines()[:4] == small.read_text().splitlines()
    assert make_example(3, 5) == make_example(3, 5)
    assert np.array_equal(np.asarray(render(make_example(3, 5).scene)), np.asarray(render(make_example(3, 5).scene)))


def test_data_synth_narrows_a_set_to_one_task_size_and_number_length(tmp_path):
    """`luvc data synth --task read --side S --read-digits L,H` writes the fresh scenes that measure reading by number
    length and image size (then `luvc eval --data`); a bad value is a usage error naming its flag, not a traceback."""
    cmd = [sys.executable, "-m", "luvc_common.cli", "data", "synth", "--out", str(tmp_path), "--n", "6", "--seed", "9"]
    subprocess.run(cmd + ["--task", "read", "--side", "252", "--read-digits", "2,2"], check=True, capture_output=True)
    records = load_jsonl(tmp_path / "data.jsonl")
    assert [r["task"] for r in records] == ["read"] * 6
    assert all(len(r["answer"]) == 2 and r["answer"].isdigit() for r in records)
    assert all(Image.open(r["image"]).size == (252, 252) for r in records)
    for flag, value in (("--read-digits", "0,3"), ("--side", "250"), ("--task", "spell"), ("--n", "0")):
        bad = subprocess.run(cmd + [flag, value], capture_output=True, text=True)  # the last --n wins
        assert bad.returncode == 2 and flag in bad.stderr and "Traceback" not in bad.stderr, (flag, bad.stderr)


@pytest.mark.parametrize("seed, n, digest", [(2000, 300, "6d8e8d16724e041d"), (3000, 600, "c3229dc59f4b2e58")])
def test_the_held_out_splits_do_not_change(seed, n, digest):
    """Every figure in docs/ was measured on these splits: a generator change (a new training option, a refactor of
    the random draws) must leave them as they are. Update the digest only when the splits are meant to change."""
    h = hashlib.sha256()
    for i in range(n):
        ex = make_example(seed, i)
        h.update(repr((ex.scene, ex.question, ex.answer, ex.task)).encode())
    assert h.hexdigest()[:16] == digest


def test_answers_valid_sizes_and_background():
    examples = [make_example(0, i) for i in range(N)]
    assert {ex.task for ex in examples} == set(TASKS)
    for ex in examples:
        if ex.task == "read":
            assert re.fullmatch(r"[1-9]\d{2,4}", ex.answer)
        else:
            assert ex.answer in ANSWERS[ex.task]
        assert normalize_answer(ex.answer) == ex.answer.lower()
        img = render(ex.scene)
        w, h = img.size
        assert img.mode == "RGB" and (w, h) == (ex.scene.width, ex.scene.height)
        assert w % 28 == 0 and h % 28 == 0 and 224 <= w <= 672 and 224 <= h <= 672
        assert min(ex.scene.background) >= 200 and img.getpixel((0, 0)) == ex.scene.background


def test_answers_recomputed_from_scene():
    for task in TASKS:
        for i in range(N):
            ex = make_example(11, i, task)
            assert ex.task == task and ex.answer == _independent_answer(ex), (task, i, ex.question)


def test_scene_questions_by_hand():
    scene = Scene(224, 224, (250, 250, 250), (Shape("circle", "red", 30, 30, 10), Shape("circle", "blue", 190, 190, 10),
                                              Shape("square", "red", 112, 112, 10)))
    asked = {(q.task, q.color, q.shape): answer_for(scene, q) for q in scene_questions(scene)}
    assert asked == {
        ("color", None, "square"): "red", ("shape", "blue", None): "circle",  # the only square / the only blue object
        ("position", "red", "circle"): "top left", ("position", "blue", "circle"): "bottom right",
        ("position", "red", "square"): "center",
        ("count", None, "circle"): "2", ("count", None, "square"): "1", ("count", None, "triangle"): "0",
        ("count", "red", "circle"): "1", ("count", "blue", "circle"): "1", ("count", "red", "square"): "1",
    }
    assert scene_questions(make_example(0, 4, "read").scene) == [QuestionSpec("read")]
    assert scene_questions(make_example(0, 5, "chart").scene) == [QuestionSpec("chart")]


def test_scene_questions_include_the_example_and_are_answerable():
    for task in TASKS:
        for i in range(N):
            ex = make_example(12, i, task)
            specs = scene_questions(ex.scene)
            assert ex.spec in specs or (task == "count" and ex.answer == "0")  # absent colour-shape pairs are left out
            for spec in specs:
                answer = answer_for(ex.scene, spec)  # raises on an ambiguous reference
                assert answer in ANSWERS[spec.task] if ANSWERS[spec.task] else answer == ex.answer


def test_rendered_pixels_match_scene():
    ex = make_example(5, 0, "color")
    obj = next(o for o in ex.scene.objects if o.shape == ex.spec.shape)
    pixel = np.array(render(ex.scene).getpixel((obj.cx, obj.cy)))
    assert np.abs(pixel - np.array(COLORS[ex.answer])).max() <= 10
    ex = make_example(5, 4, "read")
    gray = np.asarray(render(ex.scene).convert("L"))
    assert (gray < 80).sum() > 20


@pytest.mark.parametrize("raw, expected", [("Red", "red"), ("  top left. ", "top left"), ("7.", "7"),
                                           ("A", "a"), ("12345", "12345"), ("blue..", "blue.")])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_load_jsonl_resolves_paths_and_rejects_missing_key(tmp_path):
    path = write_dataset(tmp_path, 3, 1)
    records = load_jsonl(path)
    assert len(records) == 3 and all(Image.open(r["image"]).mode == "RGB" for r in records)
    lines = path.read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["answer"]
    path.write_text("\n".join([lines[0], json.dumps(broken), lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r":2: .*answer"):
        load_jsonl(path)


def test_the_second_renderer_draws_the_same_split_differently(tmp_path):
    """tools/render_alt.py: same records as the split, same image sizes, other pixels, the asked colour still drawn."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "render_alt.py"
    subprocess.run([sys.executable, str(tool), str(tmp_path), "--n", "12", "--seed", "2000"], check=True, capture_output=True)
    records = load_jsonl(tmp_path / "data.jsonl")
    assert len(records) == 12
    for i, r in enumerate(records):
        ex = make_example(2000, i)
        assert (r["question"], r["answer"], r["task"]) == (ex.question, ex.answer, ex.task)
        ours, theirs = np.asarray(render(ex.scene), dtype=int), np.asarray(Image.open(r["image"]).convert("RGB"), dtype=int)
        assert theirs.shape == ours.shape and (theirs != ours).any(-1).mean() > 0.5  # another background, palette, font
        if ex.task == "color":  # the answer's hue is drawn: some pixel is far from the light background
            assert (theirs.min(-1) < 150).any()


def test_chance_and_the_clopper_pearson_lower_bound():
    assert chance("color") == 1 / 6 and chance("count") == 1 / 10 and chance("chart") == 1 / 6
    assert chance("read") == pytest.approx((1 / 900 + 1 / 9000 + 1 / 90000) / 3)
    # published exact intervals: 1/100 -> [0.00025, 0.0545], 2/100 -> [0.0024, 0.0704], 100/100 -> [0.9638, 1]
    assert lower_bound(0, 100) == 0.0
    assert lower_bound(1, 100) == pytest.approx(0.000253, abs=1e-6)
    assert lower_bound(2, 100) == pytest.approx(0.00243, abs=1e-5)
    assert lower_bound(100, 100) == pytest.approx(0.9638, abs=1e-4)
    # the shipping bar on 100 read questions: one right answer is not clearly above a blind guess, two are
    assert lower_bound(1, 100) < chance("read") < lower_bound(2, 100)
