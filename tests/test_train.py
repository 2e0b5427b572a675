"""Training: the loss falls, resuming is exact, and the export loads with stock and split loaders."""
import argparse
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import Qwen2VLForConditionalGeneration

from luvc_common.cli import main
from luvc_common.errors import ConfigError
from luvc_common.config import ModelConfig
from luvc_common.models.loading import load_model
from luvc_common.engine.media import Media
from luvc_common.research.train import (FAMILY, AttentionPointer, QuestionProbe, Recipe, Schedule, StepBatches, VisionProbe, add_arguments, build_model, build_optimizer,
                                        covered_tokens, encode_example, evaluate, image_processor, initial_weights, load_checkpoint, start_weights, make_batch, pixels_at, recipe_at,
                                        band_places, grid_thirds, reading_places, score, token_cells, token_labels, train)
from luvc_common.research.synthvqa import (ALT_COLORS, CHARS, COLORS, POSITIONS, SHAPES, Bar, Look, QuestionSpec, Scene, Shape, answer_for, evidence, jitter_scene,
                                           make_example, question_text, random_look, render, scene_questions)
from luvc_common.models.tokenizer import build_tokenizer
from luvc_common.research.evaluate import VALIDATION_SEED

TINY = ["--text-layers", "2", "--vision-depth", "1", "--vision-dim", "64", "--max-pixels", str(112 * 112),
        "--batch-size", "2", "--warmup", "2", "--lr", "3e-3", "--eval-every", "0"]


def args_for(*extra: str) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args([*TINY, *extra])


def test_loss_falls_on_a_fixed_batch():
    args, tokenizer = args_for(), build_tokenizer(FAMILY.chat)
    model = build_model(args, tokenizer)
    batch, _ = make_batch(args.seed, range(4), tokenizer, image_processor(args.max_pixels))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_validation_scores_agree_with_the_training_loss(tmp_path):
    args, tokenizer = args_for(), build_tokenizer(FAMILY.chat)
    model = build_model(args, tokenizer)
    batch, tasks = make_batch(2000, range(6), tokenizer, image_processor(args.max_pixels))
    hits, losses, token_hits = score(model, batch)
    answer_tokens = (batch["labels"][:, 1:] != -100).sum(1)
    assert torch.allclose((losses * answer_tokens).sum() / answer_tokens.sum(), model(**batch).loss, rtol=1e-4)
    assert not hits.any()  # an untrained model reproduces no answer
    assert ((token_hits >= 0) & (token_hits < 1)).all() and (token_hits * answer_tokens).allclose((token_hits * answer_tokens).round())
    acc, loss, tokens = evaluate(model, [(batch, tasks)])
    assert acc == {"all": 0.0, **{t: 0.0 for t in tasks}}
    assert loss["all"] == pytest.approx(losses.mean().item()) and loss[tasks[0]] == pytest.approx(losses[0].item())
    assert tokens[tasks[0]] == pytest.approx(token_hits[0].item())
    train(args_for("--out", str(tmp_path), "--steps", "1", "--eval-every", "1", "--eval-n", "6"))
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert set(record["val"]) == set(record["val_loss"]) == set(record["val_tokens"]) == {"all", *tasks}


def test_score_counts_the_answer_tokens_right_given_the_gold_ones_before():
    """A model whose logits put the gold token first at two of a three-token answer scores 2/3, and not exact."""
    labels = torch.tensor([[-100, -100, 7, 8, 9]])
    logits = torch.zeros(1, 5, 20)
    for position, token in ((1, 7), (2, 8), (3, 5)):  # logits at t predict labels at t + 1
        logits[0, position, token] = 1.0

    class Fixed(torch.nn.Module):
        def forward(self, **batch):
            return SimpleNamespace(logits=logits)

    exact, _, tokens = score(Fixed(), {"labels": labels, "input_ids": labels.clamp(min=0)})
    assert not exact.item() and tokens.item() == pytest.approx(2 / 3)


def test_extra_questions_are_further_turns_about_the_same_image_that_no_turn_answers():
    tokenizer, processor = build_tokenizer(FAMILY.chat), image_processor(112 * 112)
    for index in range(24):  # four examples of each task
        one, many = (encode_example(1000, index, tokenizer, processor, Recipe(questions=q)) for q in (1, 4))
        n = len(one["ids"])
        assert many["ids"][:n] == one["ids"] and many["labels"][:n] == one["labels"]  # first turn: the serving format
        assert torch.equal(many["pixels"], one["pixels"])
        ex = make_example(1000, index)
        specs = scene_questions(ex.scene)  # the first turn's own count question may be absent (a count of 0)
        truth = {question_text(s).lower(): (s.task, answer_for(ex.scene, s)) for s in specs}
        same_task = sum(s.task == ex.task and s != ex.spec for s in specs)
        text = tokenizer.decode(many["ids"][n:])
        answers = tokenizer.decode([t for t in many["labels"][n:] if t != -100])
        assert text.count("assistant") == answers.count("<|im_end|>") == min(3, same_task)
        asked = [ex.question.lower()]
        for turn in text.split("<|im_start|> user")[1:]:
            question, answer = (part.replace("<|im_end|>", "").strip() for part in turn.split("<|im_end|> <|im_start|> assistant"))
            assert truth[question] == (ex.task, answer)  # the scene's own answer to a question of the same task
            assert not set(answer.split()) & set(re.findall(r"\w+", " ".join(asked)))  # not named by an earlier turn
            asked.append(question)


def test_recipe_tasks_distractors_and_side():
    tokenizer, processor = build_tokenizer(FAMILY.chat), image_processor(112 * 112)
    _, tasks = make_batch(1000, range(6), tokenizer, processor, Recipe(tasks=("color", "chart")))
    assert tasks == ["color", "chart"] * 3
    easy = [make_example(1000, i, "shape", max_distractors=0) for i in range(12)]
    assert all(len(ex.scene.objects) == 1 for ex in easy)
    assert any(len(make_example(1000, i, "shape").scene.objects) > 1 for i in range(12))
    assert {(ex.scene.width, ex.scene.height) for ex in (make_example(1000, i, side=252) for i in range(12))} == {(252, 252)}
    for bad in (dict(side=250), dict(side=700), dict(max_distractors=4), dict(read_digits=(0, 5)), dict(read_digits=(6, 19)),
                dict(read_height=42)):
        with pytest.raises(ValueError):
            make_example(1000, 0, **bad)


def test_long_read_lines_fit_the_image_and_label_every_digit():
    lines = [make_example(1000, i, "read", read_digits=(12, 18)) for i in range(24)]
    assert all(ex.answer.isdigit() and len(ex.answer) <= 18 for ex in lines)
    assert sum(len(ex.answer) >= 12 for ex in lines) > 12  # cut only where the image is too narrow
    for ex in lines[:6]:
        assert all(mask.any() for mask in evidence(ex.scene, ex.spec))  # every digit drawn inside the image
    assert recipe_at(args_for("--read-digits", "12,18"), 0).read_digits == (12, 18)
    assert recipe_at(args_for(), 0).read_digits == (3, 5)


def test_read_strips_hold_the_full_scene_s_number_in_fewer_pixels():
    for i in range(12):
        full, strip = make_example(1000, i, "read", read_digits=(6, 18)), make_example(1000, i, "read", read_digits=(6, 18), read_height=56)
        assert (strip.scene.height, strip.scene.width, strip.answer) == (56, full.scene.width, full.answer)
        assert all(mask.any() for mask in evidence(strip.scene, strip.spec))
    assert make_example(1000, 0, "color", read_height=56) == make_example(1000, 0, "color")  # only read scenes are cut
    args = args_for("--read-height", "56", "--read-digits", "6,18", "--tasks", "read", "--aux-weight", "1", "--char-slots", "4")
    batch, _ = make_batch(1000, range(4), build_tokenizer(FAMILY.chat), image_processor(200704), recipe_at(args, 0))
    assert batch["image_grid_thw"][:, 1].tolist() == [4] * 4  # 56 px: two rows of merged tokens, at their native size
    digits = sum(len(make_example(1000, i, "read", read_digits=(6, 18), read_height=56).answer) for i in range(4))
    assert (batch["aux_labels"][:, 5:] > 0).sum() == digits  # every digit labels a slot of its token


def test_a_strip_share_cuts_some_read_scenes_and_leaves_the_rest_full(tmp_path):
    tokenizer, processor = build_tokenizer(FAMILY.chat), image_processor(200704)
    recipe = recipe_at(args_for("--read-height", "56", "--strip-share", "0.5", "--tasks", "read,color"), 0)
    full = recipe_at(args_for("--tasks", "read,color"), 0)
    items = [(encode_example(1000, i, tokenizer, processor, recipe), encode_example(1000, i, tokenizer, processor, full)) for i in range(40)]
    cut = [i for i, (item, whole) in enumerate(items) if not torch.equal(item["pixels"], whole["pixels"])]
    assert 4 < len(cut) < 16 and all(i % 2 == 0 for i in cut)  # some read scenes, never a colour scene
    answer = lambda item: [t for t in item["labels"] if t != -100]
    assert all(items[i][0]["grid"][0, 1] == 4 and answer(items[i][0]) == answer(items[i][1]) for i in cut)  # a 56 px strip, same answer
    again = [i for i in range(40) if not torch.equal(encode_example(1000, i, tokenizer, processor, recipe)["pixels"], items[i][1]["pixels"])]
    assert again == cut  # drawn per example, not per call
    with pytest.raises(ConfigError, match="--strip-share 0.5 .*give --read-height"):
        train(args_for("--out", str(tmp_path), "--steps", "1", "--strip-share", "0.5"))


def test_curriculum_ramps_distractors_up_to_the_maximum():
    ramp = lambda *flags: [recipe_at(args_for(*flags), step).max_distractors for step in (0, 99, 100, 250, 399, 400, 5000)]
    assert ramp("--curriculum", "400") == [0, 0, 1, 2, 3, 3, 3]
    assert ramp("--curriculum", "400", "--max-distractors", "1") == [0, 0, 0, 1, 1, 1, 1]
    assert ramp("--max-distractors", "0") == [0] * 7
    assert ramp() == [3] * 7


def test_dynamic_resolution_draws_each_step_s_image_budget_and_keeps_the_export_s(tmp_path):
    args = args_for("--max-pixels", "50176", "--low-pixels", "12544", "--tasks", "color")
    budgets = [pixels_at(args, step) for step in range(300)]
    assert budgets == [pixels_at(args, step) for step in range(300)]  # a function of the step: resuming needs no state
    assert min(budgets) >= 12544 and max(budgets) <= 50176 and all(b % 784 == 0 for b in budgets)
    assert sum(b < 25088 for b in budgets) > 100 and sum(b >= 25088 for b in budgets) > 100  # log-uniform: half below the midpoint
    assert {pixels_at(args_for("--max-pixels", "50176"), step) for step in range(300)} == {50176}
    small = min(range(300), key=budgets.__getitem__)
    tokens = lambda a, step: int(StepBatches(a)[step]["image_grid_thw"].prod(-1).sum())
    assert tokens(args, small) < tokens(args_for("--max-pixels", "50176", "--tasks", "color"), small) / 2  # the same images, fewer patches
    out = tmp_path / "model"
    train(args_for("--out", str(tmp_path / "run"), "--steps", "1", "--low-pixels", "12544", "--max-pixels", "25088", "--export", str(out)))
    assert json.loads((out / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 25088


@pytest.mark.parametrize("low", ["10000", "25088"])
def test_a_low_pixel_budget_outside_the_processor_s_range_is_a_user_error(tmp_path, capsys, low):
    assert main(["train", "--out", str(tmp_path), *TINY, "--steps", "1", "--low-pixels", low]) == 2
    assert f"--low-pixels {low}: expected 12544" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--tasks", "color,colour"], ["--side", "250"], ["--max-distractors", "4"], ["--questions", "0"],
                                   ["--read-digits", "5"], ["--read-digits", "5,3"], ["--read-digits", "3,19"],
                                   ["--read-height", "50"], ["--read-height", "252"],
                                   ["--strip-share", "0"], ["--strip-share", "1.5"]])
def test_bad_recipe_flags_are_rejected(flags, capsys):
    with pytest.raises(SystemExit):
        args_for(*flags)
    assert f"argument {flags[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("aux", [(), ("--aux-weight", "0.5", "--augment"), ("--pointer-weight", "1", "--pointer-layers", "0,1"),
                                 ("--aux-weight", "0.5", "--char-slots", "2", "--vision-only"),
                                 ("--aux-weight", "0.5", "--question-weight", "1", "--question-layer", "1")],
                         ids=["plain", "aux", "pointer", "vision-only", "question"])
def test_resume_continues_exactly(tmp_path, aux):
    """4 steps in one go == 2 steps, then 2 more resumed (a constant LR after warm-up, so --steps can grow)."""
    const = ("--min-lr-frac", "1", *aux)
    train(args_for("--out", str(tmp_path / "a"), "--steps", "4", *const))
    train(args_for("--out", str(tmp_path / "b"), "--steps", "2", *const))
    saved = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    args = args_for("--steps", "4", *const)
    model = build_model(args, build_tokenizer(FAMILY.chat))
    heads = {"probe": VisionProbe(model, char_slots=args.char_slots)} if args.aux_weight else {}
    if args.question_weight:
        heads["question"] = QuestionProbe(model, args.question_layer)
    opt = build_optimizer(model, args, *heads.values())
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt", model, opt, Schedule(args.lr, 4, 2, 1.0, None), heads) == 2
    for k, s in opt.state_dict()["state"].items():
        assert all(torch.equal(s[name], saved["optimizer"]["state"][k][name]) for name in ("exp_avg", "exp_avg_sq", "step"))
    with open(tmp_path / "b" / "log.jsonl", "a") as log:  # a step logged after the last checkpoint, then killed
        log.write(json.dumps({"step": 3, "loss": 9.9}) + "\n")
    train(args_for("--out", str(tmp_path / "b"), "--steps", "4", "--resume", *const))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, s in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s[name], b["optimizer"]["state"][k][name]), (k, name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the killed run's step 3 is gone


def test_cpu_bf16_trains_under_autocast_with_fp32_weights(tmp_path):
    """--cpu-bf16 changes the forward pass's arithmetic (the first loss moves a little), not what is stored."""
    flags = ("--steps", "2", "--aux-weight", "1", "--char-slots", "2", "--eval-every", "2", "--eval-n", "6")
    fp32, bf16 = (train(args_for("--out", str(tmp_path / name), *flags, *extra)) for name, extra in (("a", ()), ("b", ("--cpu-bf16",))))
    first = [json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[0])["loss"] for d in "ab"]
    assert first[0] != first[1] and abs(first[0] - first[1]) < 0.02 * first[0], first
    assert set(bf16["val"]) == set(fp32["val"]) and np.isfinite(bf16["aux_loss"])
    weights = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("native", [False, True])
def test_cpu_bf16_warns_where_the_cpu_only_emulates_bf16(tmp_path, capsys, monkeypatch, native):
    """The hardware probe is replaced (this machine is one CPU or the other); the warning follows what it says."""
    monkeypatch.setattr("luvc_common.research.train.native_cpu_bf16", lambda: native)
    train(args_for("--out", str(tmp_path), "--steps", "1", "--cpu-bf16"))
    assert ("bf16 is emulated there" in capsys.readouterr().err) is not native


def test_the_step_benchmark_times_both_precisions():
    tool = Path(__file__).parent.parent / "tools" / "bench_train_step.py"
    run = subprocess.run([sys.executable, str(tool), *TINY, "--repeats", "2", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(re.findall(r"pass 1 (fp32|bf16): [\d.]+ s, loss [\d.]+", run.stdout)) == 4, run.stdout
    assert re.search(r"median s/step: fp32 [\d.]+, bf16 [\d.]+; bf16 is [\d.]+x faster", run.stdout), run.stdout


@pytest.mark.parametrize("first, then", [((), ("--question-weight", "1")), (("--question-weight", "1"), ()),
                                         (("--aux-weight", "1"), ("--question-weight", "1"))])
def test_resuming_with_other_training_heads_is_a_user_error(tmp_path, capsys, first, then):
    assert main(["train", "--out", str(tmp_path), *TINY, "--steps", "1", *first]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path), *TINY, "--steps", "2", "--resume", *then]) == 2
    assert "resume with the flags it was trained with" in capsys.readouterr().err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 1


def test_probe_chain_reports_every_link_of_a_checkpoint(tmp_path):
    """tools/probe_chain.py on a small trained checkpoint (it was once broken for two sessions unnoticed)."""
    flags = [*TINY, "--aux-weight", "1", "--aux-balanced", "--cell-layer", "0", "--char-slots", "2"]
    train(args_for("--out", str(tmp_path), "--steps", "1", *flags[len(TINY):]))
    tool = Path(__file__).parent.parent / "tools" / "probe_chain.py"
    run = subprocess.run([sys.executable, str(tool), str(tmp_path / "ckpt.pt"), *flags, "--n", "12", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert re.search(r"up to 0 distractors; probe accuracy on the visual tokens: color [\d.]+, shape [\d.]+.*cell [\d.]+", out), out
    for task in ("color", "shape", "position", "count"):
        assert re.search(rf"{task} +exact [\d.]+ +answer loss [\d.]+ .* L0 [\d.]+ \([\d.]+\) L1 [\d.]+ \([\d.]+\)", out), out
    for what in ("colour", "shape"):
        assert re.search(rf"the {what} the question names .*: embedding [\d.]+ L0 [\d.]+ L1 [\d.]+ \(majority class [\d.]+\)", out), out


def test_probe_slots_scores_every_labelled_digit_once_per_split(tmp_path):
    """tools/probe_slots.py on a small checkpoint: each split (ambiguity, x place, y place) partitions the same digits."""
    flags = [*TINY, "--aux-weight", "1", "--char-slots", "2"]
    train(args_for("--out", str(tmp_path), "--steps", "1", *flags[len(TINY):], "--tasks", "read"))
    tool = [sys.executable, str(Path(__file__).parent.parent / "tools" / "probe_slots.py"), str(tmp_path / "ckpt.pt")]
    run = subprocess.run([*tool, *flags, "--n", "6", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"^\d+ digits in 6 read scenes; .* median [\d.]+, under 0.6 for [\d.]+", run.stdout, re.M), run.stdout
    counts = {k: (int(r), int(n)) for k, r, n in re.findall(r"slots right, ([\w :]+): (\d+)/(\d+)", run.stdout)}
    right, total = counts.pop("all")
    assert total > 0
    for split in ("clean|ambiguous", "x: ", "y: "):
        part = [v for k, v in counts.items() if re.match(split, k)]
        assert (sum(r for r, _ in part), sum(n for _, n in part)) == (right, total), run.stdout
    assert re.search(r"^numbers read exactly off the heads: \d+/6 = [\d.]+$", run.stdout, re.M), run.stdout
    refused = subprocess.run([*tool, *TINY, "--aux-weight", "1"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--char-slots" in refused.stderr


def test_reading_places_give_each_digit_the_token_with_most_of_its_ink_in_reading_order():
    cell = np.array([[0, 0, 1, 1]])
    masks = [np.array([[1, 1, 1, 0]], bool), np.array([[0, 1, 0, 0]], bool), np.zeros((1, 4), bool), np.array([[0, 0, 1, 1]], bool)]
    assert reading_places(masks, cell, 2) == [(0, 0), (0, 1), None, (1, 0)]


def test_band_places_name_each_digit_once_by_the_band_of_its_ink_centre():
    """A 56 x 28 scene, one row of two 28-px tokens in 7-px bands: ink centred at x 3, 20, 26.5 and 30."""
    masks = np.zeros((5, 28, 56), bool)
    for mask, (x0, x1) in zip(masks, [(2, 5), (19, 22), (25, 29), (29, 32)]):
        mask[10:20, x0:x1] = True
    assert band_places(list(masks), Scene(56, 28, (240, 240, 240)), torch.tensor([[1, 2, 4]]), 2, 4) == [(0, 0), (0, 2), (0, 3), (1, 0), None]
    tall = np.zeros((56, 28), bool)
    tall[38:43, 10:13] = True  # centre y 40: the second token row of a 28 x 56 scene
    assert band_places([tall], Scene(28, 56, (240, 240, 240)), torch.tensor([[1, 4, 2]]), 2, 2) == [(1, 0)]


def test_char_bands_reach_the_training_labels_and_need_char_slots(tmp_path):
    """--char-bands changes the slot columns of encode_example's labels (a read scene), nothing else; without
    --char-slots it is refused."""
    tokenizer, processor = build_tokenizer(FAMILY.chat), image_processor(200704)
    bands, order = (encode_example(1000, 4, tokenizer, processor, recipe_at(args_for("--aux-weight", "1", "--char-slots", "4",
                    *flag, "--tasks", "read"), 0))["aux_labels"] for flag in (["--char-bands"], []))
    assert torch.equal(bands[:, :5], order[:, :5]) and not torch.equal(bands[:, 5:], order[:, 5:])
    assert sorted(bands[:, 5:][bands[:, 5:] > 0].tolist()) == sorted(order[:, 5:][order[:, 5:] > 0].tolist())
    with pytest.raises(ConfigError, match="--char-bands: .*give --char-slots"):
        train(args_for("--out", str(tmp_path), "--steps", "1", "--aux-weight", "1", "--char-bands"))


@pytest.mark.parametrize("bands", [False, True])
def test_char_slot_labels_read_back_as_the_number(bands):
    """probe_slots' read-out of a tower's slot heads, applied to the targets themselves, gives back each validation
    number (both slot rules), so a tower that learnt its targets reads the number."""
    read_out = runpy.run_path(str(Path(__file__).parent.parent / "tools" / "probe_slots.py"))["read_out"]
    processor = image_processor(200704)
    for i in range(6):
        scene = make_example(VALIDATION_SEED, i, "read").scene
        _, grid = FAMILY.patchify([Media("image", [render(scene)])], processor)
        slots = token_labels(scene, Look(), grid, char_slots=4, bands=bands)[:, 5:].numpy()
        assert read_out(slots, int(grid[0, 2]) // 2, bands) == scene.text
        assert sorted(slots[slots > 0].tolist()) == sorted(1 + CHARS.index(c) for c in scene.text)


def test_token_labels_line_up_with_the_merged_token_grid():
    """A 336x224 scene resized to 224 x 140 px (8 x 5 merged tokens of 28 px): each label sits where the object is."""
    scene = Scene(336, 224, (240, 240, 240), objects=(Shape("square", "blue", 80, 67, 20), Shape("circle", "red", 250, 170, 15)))
    _, grid = FAMILY.patchify([Media("image", [render(scene)])], image_processor(224 * 168))
    assert grid.tolist() == [[1, 10, 16]]
    color, shape, char, tallest, centre = (token_labels(scene, Look(), grid)[:, i].reshape(5, 8) for i in range(5))
    blue, red = 1 + list(COLORS).index("blue"), 1 + list(COLORS).index("red")
    expected = torch.zeros(5, 8, dtype=torch.long)
    expected[1, 1:3] = blue  # the square: x 60-100, y 47-87 px, resized to x 40-67, y 29-54
    expected[3:5, 5:7] = red  # the circle: x 235-265, y 155-185 px, resized to x 157-177, y 97-116
    assert torch.equal(color, expected)
    assert torch.equal(shape, (expected == blue) * 2 + (expected == red) * 1)  # square 2, circle 1
    assert centre.nonzero().tolist() == [[1, 1], [3, 5]]
    assert not char.any() and not tallest.any()
    chart = Scene(224, 224, (240, 240, 240), font_size=16, baseline=180,
                  bars=(Bar("A", 20, 60, 50, "red"), Bar("B", 120, 200, 150, "green")))
    _, _, char, tallest, _ = (token_labels(chart, Look(), torch.tensor([[1, 16, 16]]))[:, i].reshape(8, 8) for i in range(5))
    assert tallest[1:7, 4:8].all() and not tallest[:, :4].any()  # bar B (x 120-200, y 30-180) and its label below
    assert char[6, 5] == 10 + 2  # the letter B, after the ten digits, in its cell


def test_char_slots_list_each_token_s_characters_in_reading_order():
    """"40718" in 13-px digits from x=30, ink rows 107-122, unresized in 28-px tokens: "4" and "0" fall in token column
    1, "7" and "1" in column 2, "8" mostly in column 3, all in token row 4; other columns are unchanged."""
    scene = Scene(224, 224, (240, 240, 240), text="40718", text_xy=(30, 100), font_size=22)
    grid = torch.tensor([[1, 16, 16]])
    labels = token_labels(scene, Look(), grid, char_slots=2)
    assert torch.equal(labels[:, :5], token_labels(scene, Look(), grid)) and labels.shape == (64, 7)
    slots = labels[:, 5:].reshape(8, 8, 2)
    assert slots[4, 1].tolist() == [1 + 4, 1 + 0] and slots[4, 2].tolist() == [1 + 7, 1 + 1] and slots[4, 3].tolist() == [1 + 8, 0]
    assert slots.count_nonzero() == 5
    assert token_labels(scene, Look(), grid, char_slots=1)[:, 5].reshape(8, 8)[4, 1:4].tolist() == [1 + 4, 1 + 7, 1 + 8]
    assert not token_labels(Scene(224, 224, (240, 240, 240)), Look(), grid, char_slots=2)[:, 5:].any()


def test_char_slot_losses_count_as_one_label_kind():
    model = build_model(args_for(), build_tokenizer(FAMILY.chat))
    probe = VisionProbe(model, char_slots=3)
    tokens, labels = torch.randn(10, 256), torch.randint(0, 2, (10, 8))
    probe.tokens = tokens
    losses = [F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(probe.head(tokens).split(probe.sizes, -1))]
    assert probe.sizes[5:] == [17] * 3
    kinds = [*losses[:5], torch.stack(losses[5:]).mean()]
    assert probe.loss(labels).item() == pytest.approx(torch.stack(kinds).mean().item(), rel=1e-5)
    probe.char_weight = 3.0  # --char-weight: the majority character (kind 2) and the slots weigh 3, the rest 1
    weighted = [3 * k if i in (2, 5) else k for i, k in enumerate(kinds)]
    assert probe.loss(labels).item() == pytest.approx(torch.stack(weighted).mean().item(), rel=1e-5)


def test_char_weight_reaches_the_training_loss(tmp_path):
    """--char-weight is wired from the command line to the probe: the same first batch, from the same init, gets a
    larger dense loss and the same answer loss."""
    flags = ["--steps", "1", "--aux-weight", "1", "--char-slots", "2"]
    train(args_for("--out", str(tmp_path / "plain"), *flags))
    train(args_for("--out", str(tmp_path / "weighted"), *flags, "--char-weight", "3"))
    plain, weighted = (json.loads((tmp_path / run / "log.jsonl").read_text()) for run in ("plain", "weighted"))
    assert weighted["loss"] == plain["loss"] and weighted["aux_loss"] > 1.2 * plain["aux_loss"]


def test_init_from_a_checkpoint_keeps_the_training_heads_that_fit(tmp_path, capsys):
    """A next stage starts its dense and question heads where --init's run left them, not from random; a head of
    another shape (here more char slots) starts fresh, and so do all heads from an exported model directory or with
    --init-vision."""
    flags = ["--steps", "1", "--aux-weight", "1", "--char-slots", "2", "--question-weight", "1"]
    train(args_for("--out", str(tmp_path / "first"), *flags, "--export", str(tmp_path / "model")))
    first = torch.load(tmp_path / "first" / "ckpt.pt", weights_only=False)
    next_stage = ["--init", str(tmp_path / "first" / "ckpt.pt"), "--lr", "0"]  # lr 0: the heads stay as loaded
    train(args_for("--out", str(tmp_path / "next"), *flags, *next_stage))
    warm = torch.load(tmp_path / "next" / "ckpt.pt", weights_only=False)
    for name in ("probe", "question"):
        assert all(torch.equal(warm[name][k], w) for k, w in first[name].items()), name
    assert "training heads from --init: probe, question; fresh: none" in capsys.readouterr().out
    train(args_for("--out", str(tmp_path / "slots"), *flags, *next_stage, "--char-slots", "3"))
    slots = torch.load(tmp_path / "slots" / "ckpt.pt", weights_only=False)
    assert all(torch.equal(slots["question"][k], w) for k, w in first["question"].items())
    assert "training heads from --init: question; fresh: probe" in capsys.readouterr().out
    train(args_for("--out", str(tmp_path / "exported"), *flags, "--init", str(tmp_path / "model"), "--lr", "0"))
    exported = torch.load(tmp_path / "exported" / "ckpt.pt", weights_only=False)
    assert not torch.equal(exported["question"]["colour.weight"], first["question"]["colour.weight"])
    assert "training heads from --init: none; fresh: probe, question" in capsys.readouterr().out
    train(args_for("--out", str(tmp_path / "eyes"), *flags, *next_stage, "--init-vision", str(tmp_path / "model")))
    assert "training heads from --init: none; fresh: probe, question" in capsys.readouterr().out  # they read another tower


def test_evidence_is_where_each_answer_is_drawn():
    """The pointer targets: the referred objects' tokens, each digit's token in reading order, nothing for a count of 0."""
    scene = Scene(336, 224, (240, 240, 240), objects=(Shape("square", "blue", 80, 67, 20), Shape("circle", "red", 250, 170, 15),
                                                     Shape("circle", "blue", 250, 50, 15)))
    grid = torch.tensor([[1, 10, 16]])  # 8 x 5 merged tokens of 28 px once resized to 224 x 140
    cell, n, min_pixels = token_cells(scene, grid)
    def tokens(spec: QuestionSpec) -> list[list[tuple[int, int]]]:
        return [[divmod(int(t), 8) for t in covered_tokens(m, cell, n, min_pixels)] for m in evidence(scene, spec)]
    assert tokens(QuestionSpec("shape", color="red")) == [[(3, 5), (3, 6), (4, 5), (4, 6)]]
    assert tokens(QuestionSpec("color", shape="square")) == [[(1, 1), (1, 2)]]
    blue_circle, red_circle = tokens(QuestionSpec("position", "blue", "circle"))[0], tokens(QuestionSpec("position", "red", "circle"))[0]
    assert tokens(QuestionSpec("count", shape="circle")) == [sorted(blue_circle + red_circle)]
    assert tokens(QuestionSpec("count", "green", "circle")) == []
    text = Scene(448, 224, (240, 240, 240), text="4071", text_xy=(20, 100), font_size=60)
    digits = evidence(text, QuestionSpec("read"))
    assert len(digits) == 4 and all(m.any() for m in digits)
    left_edges = [np.flatnonzero(m.any(0))[0] for m in digits]
    assert left_edges == sorted(left_edges) and len(set(left_edges)) == 4
    ink = np.asarray(render(text).convert("L")) < 128
    assert (np.logical_or.reduce(digits) & ~ink).sum() <= 0.1 * ink.sum()  # the masks are the drawn digits


def test_pointer_targets_follow_the_answer_tokens():
    """Each query is the position that predicts an answer token; its keys are image tokens of the prompt."""
    tokenizer, processor = build_tokenizer(FAMILY.chat), image_processor(224 * 224)
    image = tokenizer.convert_tokens_to_ids(FAMILY.chat.image)
    for index in range(6):
        item = encode_example(1000, index, tokenizer, processor, Recipe(questions=3, pointer=True))
        ids, labels = item["ids"], item["labels"]
        assert item["pointers"] or item["task"] == "count"
        for query, keys in item["pointers"]:
            assert labels[query] == -100 or labels[query + 1] != -100  # a prompt token or an answer token...
            assert labels[query + 1] not in (-100, tokenizer.convert_tokens_to_ids(FAMILY.chat.turn_end))  # ...predicting an answer
            assert keys.size and all(ids[k] == image for k in keys)
        if item["task"] == "read":
            digits = [q for q, _ in item["pointers"]]
            assert digits == list(range(digits[0], digits[0] + len(digits)))


def training_losses(model, batch: dict, loss_of_last_forward, params, steps: int = 20) -> list[float]:
    """A training-only loss over `steps` AdamW steps on one batch; the loss reads what the model's forward hooks caught."""
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(steps):
        model(**batch)
        loss = loss_of_last_forward()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_the_pointer_loss_teaches_the_head_and_leaves_the_export_stock(tmp_path):
    args, tokenizer = args_for("--pointer-weight", "1", "--pointer-layers", "1"), build_tokenizer(FAMILY.chat)
    model = build_model(args, tokenizer)
    pointer = AttentionPointer(model, args.pointer_layers)
    batch, _ = make_batch(args.seed, range(6), tokenizer, image_processor(args.max_pixels), Recipe(pointer=True))
    targets = [batch.pop(k) for k in ("pointer_rows", "pointer_queries", "pointer_keys")]
    losses = training_losses(model, batch, lambda: pointer.loss(*targets), model.parameters())
    assert losses[-1] < 0.3 * losses[0], [round(v, 2) for v in losses]
    with pytest.raises(ConfigError, match="--pointer-layers 2: the LLM has 2 layers"):
        AttentionPointer(model, (2,))
    out = tmp_path / "model"
    train(args_for("--out", str(tmp_path / "run"), "--steps", "2", "--pointer-weight", "1", "--pointer-layers", "1", "--export", str(out)))
    assert "pointer_loss" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert "eager" not in (out / "config.json").read_text()
    assert Qwen2VLForConditionalGeneration.from_pretrained(out).config.text_config._attn_implementation != "eager"


def test_question_targets_name_what_each_turn_asks():
    """One target per turn, at the position that predicts its first answer token; the classes are the colour and
    shape words of that turn's question (0 when it names none)."""
    tokenizer, processor = build_tokenizer(FAMILY.chat), image_processor(224 * 224)
    for index in range(12):
        item = encode_example(1000, index, tokenizer, processor, Recipe(questions=3, question=True))
        ids, labels = item["ids"], item["labels"]
        starts = [0] + [i + 1 for i in range(len(ids) - 1) if labels[i] != -100 and labels[i + 1] == -100]  # each turn's prompt
        assert len(item["questions"]) == sum(labels[i] == -100 and labels[i + 1] != -100 for i in range(len(ids) - 1))
        for query, colour, shape in item["questions"]:
            assert labels[query] == -100 and labels[query + 1] != -100
            words = tokenizer.convert_ids_to_tokens(ids[max(i for i in starts if i <= query):query])
            named_colour = [c for c in COLORS if c in words]
            named_shape = [s for s in SHAPES if any(w in (s, s + "s") for w in words)]
            assert colour == (1 + list(COLORS).index(named_colour[0]) if named_colour else 0), (words, colour)
            assert shape == (1 + SHAPES.index(named_shape[0]) if named_shape else 0), (words, shape)
        if item["task"] in ("read", "chart"):
            assert all(c == s == 0 for _, c, s in item["questions"])


def test_the_question_loss_teaches_the_layer_and_is_not_exported(tmp_path):
    args, tokenizer = args_for("--question-weight", "1", "--question-layer", "0"), build_tokenizer(FAMILY.chat)
    model = build_model(args, tokenizer)
    question = QuestionProbe(model, args.question_layer)
    batch, _ = make_batch(args.seed, range(8), tokenizer, image_processor(args.max_pixels), Recipe(tasks=("color", "shape"), question=True))
    targets = [batch.pop(k) for k in ("question_rows", "question_queries", "question_labels")]
    losses = training_losses(model, batch, lambda: question.loss(*targets), [*model.parameters(), *question.parameters()])
    assert losses[-1] < 0.5 * losses[0], [round(v, 2) for v in losses]
    out = tmp_path / "model"
    train(args_for("--out", str(tmp_path / "run"), "--steps", "2", "--question-weight", "1", "--export", str(out)))
    assert "question_loss" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["question"]["colour.weight"].shape == (1 + len(COLORS), 256)
    _, info = Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info


def test_grid_thirds_are_the_position_answers_of_each_token():
    thirds = grid_thirds(torch.tensor([[1, 6, 12], [2, 4, 4]]))  # 3 x 6 tokens, then 2 frames of 2 x 2
    assert thirds[:18].reshape(3, 6).tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [6, 6, 7, 7, 8, 8]]
    assert thirds[18:].tolist() == [0, 2, 6, 8] * 2
    names = [p for row in POSITIONS for p in row]
    scene = Scene(336, 168, (240, 240, 240), objects=(Shape("circle", "red", 300, 20, 10),))  # 12 x 6 tokens
    assert names[int(grid_thirds(torch.tensor([[1, 12, 24]]))[11])] == answer_for(scene, QuestionSpec("position", "red", "circle"))


def test_the_balanced_probe_weighs_objects_like_the_background():
    model = build_model(args_for(), build_tokenizer(FAMILY.chat))
    plain, balanced = VisionProbe(model), VisionProbe(model, balanced=True)
    balanced.load_state_dict(plain.state_dict())
    tokens, labels = torch.randn(10, 256), torch.zeros(10, 5, dtype=torch.long)
    labels[:2, 0] = 3  # two object tokens among ten
    plain.tokens = balanced.tokens = tokens
    colour = F.cross_entropy(plain.head(tokens)[:, :7], labels[:, 0], reduction="none")
    rest = [F.cross_entropy(lg, labels[:, i + 1]) for i, lg in enumerate(plain.head(tokens).split(plain.sizes, -1)[1:])]
    assert plain.loss(labels).item() == pytest.approx(torch.stack([colour.mean(), *rest]).mean().item(), rel=1e-5)
    even = (colour[:2].mean() + colour[2:].mean()) / 2
    assert balanced.loss(labels).item() == pytest.approx(torch.stack([even, *rest]).mean().item(), rel=1e-5)


@pytest.mark.parametrize("flags, message", [(["--aux-balanced"], "need --aux-weight"), (["--cell-layer", "0"], "need --aux-weight"),
                                            (["--char-slots", "2"], "need --aux-weight"), (["--char-weight", "4"], "need --aux-weight"),
                                            (["--aux-weight", "1", "--char-weight", "-1"], "--char-weight -1.0: must be >= 0"),
                                            (["--aux-weight", "1", "--cell-layer", "5"], "--cell-layer 5: the LLM has 2 layers"),
                                            (["--vision-only"], "needs --aux-weight"),
                                            (["--vision-only", "--aux-weight", "1", "--pointer-weight", "1"], "excludes --pointer-weight"),
                                            (["--vision-only", "--aux-weight", "1", "--question-weight", "1"], "--question-weight"),
                                            (["--question-weight", "1", "--question-layer", "2"], "--question-layer 2: the LLM has 2 layers")])
def test_dense_loss_options_without_their_loss_or_layer_are_user_errors(tmp_path, capsys, flags, message):
    assert main(["train", "--out", str(tmp_path), *TINY, "--steps", "1", *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_cell_probe_trains_from_an_llm_layer_and_is_not_exported(tmp_path):
    out = tmp_path / "model"
    train(args_for("--out", str(tmp_path / "run"), "--steps", "2", "--aux-weight", "1", "--cell-layer", "0", "--export", str(out)))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["probe"]["cell_head.weight"].shape == (9, 256)
    _, info = Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info


def test_the_vision_probe_trains_but_is_not_exported(tmp_path):
    out = tmp_path / "model"
    train(args_for("--out", str(tmp_path / "run"), "--steps", "2", "--aux-weight", "1", "--export", str(out)))
    assert "aux_loss" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["probe"]["head.weight"].shape[0] == 7 + 4 + 17 + 2 + 2
    train(args_for("--out", str(tmp_path / "slots"), "--steps", "1", "--aux-weight", "1", "--char-slots", "2", "--tasks", "read"))
    assert torch.load(tmp_path / "slots" / "ckpt.pt", weights_only=False)["probe"]["head.weight"].shape[0] == 7 + 4 + 17 + 2 + 2 + 2 * 17
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any(k.split(".")[0] in ("head", "probe") for k in f.keys())
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)  # a stock model
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights


def test_rope_flags_reach_the_exported_config():
    config = build_model(args_for("--rope-theta", "10", "--mrope-section", "4,14,14"), build_tokenizer(FAMILY.chat)).config.text_config
    assert config.rope_parameters["rope_theta"] == 10.0 and config.rope_parameters["mrope_section"] == [4, 14, 14]


def test_augmentation_is_for_training_only():
    """The held-out splits (and every Recipe() batch) are drawn in the default look; --augment changes training pixels only."""
    tokenizer, processor = build_tokenizer(FAMILY.chat), image_processor(112 * 112)
    assert recipe_at(args_for(), 0).augment is False and recipe_at(args_for("--augment"), 0).augment is True
    for seed in (2000, 3000):
        ex = make_example(seed, 0)
        plain = encode_example(seed, 0, tokenizer, processor)["pixels"]
        assert torch.equal(plain, FAMILY.patchify([Media("image", [render(ex.scene)])], processor)[0])
    assert Look().palette == COLORS and Look().font is None
    plain, varied = (encode_example(1000, 0, tokenizer, processor, Recipe(augment=a)) for a in (False, True))
    assert varied["ids"] == plain["ids"] and not torch.equal(varied["pixels"], plain["pixels"])
    rng = np.random.default_rng(0)
    scene = make_example(1000, 3).scene  # position: jittering keeps every answer
    for _ in range(5):
        assert [answer_for(jitter_scene(scene, rng), s) for s in scene_questions(scene)] == [answer_for(scene, s) for s in scene_questions(scene)]
        look = random_look(rng)  # each colour stays nearest to its own name's renderings
        anchors = [(name, rgb) for palette in (COLORS, ALT_COLORS) for name, rgb in palette.items()]
        for name, rgb in look.palette.items():
            assert min(anchors, key=lambda a: sum((x - y) ** 2 for x, y in zip(a[1], rgb)))[0] == name


def test_loader_workers_give_the_same_run(tmp_path):
    """Batches are a pure function of the step, so a worker process builds exactly the in-loop batches."""
    for workers in ("0", "1"):
        train(args_for("--out", str(tmp_path / workers), "--steps", "2", "--workers", workers))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["model"] for d in "01")
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_a_bad_device_is_a_user_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--device", "tpu0"]) == 2
    assert 'expected "auto"' in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--workers", "-1"), ("--steps", "0"), ("--batch-size", "0"), ("--curriculum", "-5"),
                                         ("--eval-every", "-1"), ("--threads", "x")])
def test_bad_numeric_flags_are_usage_errors(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--out", str(tmp_path), flag, value])
    assert exit.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.gpu
def test_trains_and_resumes_on_cuda(tmp_path):
    train(args_for("--out", str(tmp_path), "--steps", "2", "--device", "cuda"))
    train(args_for("--out", str(tmp_path), "--steps", "3", "--device", "cuda", "--resume", "--min-lr-frac", "1"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_export_loads(tmp_path):
    out = tmp_path / "model"
    train(args_for("--out", str(tmp_path / "run"), "--steps", "1", "--export", str(out)))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o666 & ~umask for f in out.iterdir()}  # others can read it
    assert json.loads((out / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 112 * 112
    full = Qwen2VLForConditionalGeneration.from_pretrained(out)
    vision = load_model(ModelConfig(str(out)), "vision")
    language = load_model(ModelConfig(str(out)), "language")
    assert vision.model.language_model is None and language.model.visual is None
    for name, p in vision.named_parameters():
        assert torch.equal(p, full.get_parameter(name).float()), name


def test_average_models_writes_the_mean_of_two_exports_and_refuses_other_architectures(tmp_path):
    """tools/average_models.py (a model soup): the uniform mean of two runs' exports loads as a stock model."""
    for seed in ("1", "2"):
        train(args_for("--out", str(tmp_path / f"run{seed}"), "--steps", "1", "--seed", seed, "--export", str(tmp_path / seed)))
    tool = [sys.executable, str(Path(__file__).parent.parent / "tools" / "average_models.py")]
    run = subprocess.run([*tool, str(tmp_path / "soup"), str(tmp_path / "1"), str(tmp_path / "2")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    one, two, soup = (Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / d, torch_dtype=torch.float32).state_dict() for d in ("1", "2", "soup"))
    assert soup.keys() == one.keys() and any(not torch.equal(one[k], two[k]) for k in one)
    for name, w in soup.items():
        assert torch.equal(w, ((one[name] + two[name]) / 2).bfloat16().float()), name
    assert not (tmp_path / "soup" / "README.md").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "soup" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # a service's user can read it
    train(args_for("--out", str(tmp_path / "run3"), "--steps", "1", "--rope-theta", "100", "--export", str(tmp_path / "3")))
    for models, error in (([tmp_path / "1", tmp_path / "3"], "not one architecture"), ([tmp_path / "1"], "Usage"),
                          ([tmp_path / "1", tmp_path / "none"], "not a model directory")):
        run = subprocess.run([*tool, str(tmp_path / "no"), *map(str, models)], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and error in run.stderr and not (tmp_path / "no").exists(), run.stderr[-2000:]


def test_widen_vision_doubles_the_tower_without_changing_its_tokens_and_a_run_continues_it(tmp_path):
    """tools/widen_vision.py: a 128-wide tower (heads of 32) widened to 256 hands the LLM the same visual tokens
    (without noise), keeps the LLM, and is the model `--vision-dim 256` builds, so a run starts from it; the default
    noise makes each channel's copy differ from the original, which keeps its weights."""
    train(args_for("--out", str(tmp_path / "run"), "--steps", "1", "--vision-dim", "128", "--export", str(tmp_path / "narrow")))
    tool = Path(__file__).parent.parent / "tools" / "widen_vision.py"
    widen = lambda out, *argv: subprocess.run([sys.executable, str(tool), str(tmp_path / "narrow"), str(tmp_path / out), *argv],
                                              capture_output=True, text=True, timeout=120)
    for run in (widen("exact", "--noise", "0"), widen("wide")):
        assert run.returncode == 0, run.stderr[-2000:]
    narrow, exact, wide = (Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / d, torch_dtype=torch.float32).eval()
                           for d in ("narrow", "exact", "wide"))
    assert (exact.config.vision_config.embed_dim, exact.config.vision_config.num_heads) == (256, 8)
    llm = {k: w for k, w in narrow.state_dict().items() if ".visual." not in f".{k}"}
    assert all(torch.equal(w, exact.state_dict()[k]) and torch.equal(w, wide.state_dict()[k]) for k, w in llm.items())
    in_memory = type(exact)(exact.config).eval()  # fp32 shares, before the export rounds them to bf16
    in_memory.load_state_dict(runpy.run_path(str(tool))["widen_tower"](narrow.state_dict(), 128, 256, 2))
    torch.manual_seed(0)
    patches, grid = torch.randn(24, 3 * 2 * 14 * 14), torch.tensor([[1, 4, 6]])
    with torch.no_grad():
        before, fp32, exported = (m.model.visual(patches, grid_thw=grid).pooler_output for m in (narrow, in_memory, exact))
    assert before.shape == exported.shape == (6, 256)
    assert torch.allclose(fp32, before, atol=1e-5, rtol=1e-4)
    assert (exported - before).abs().max() < 0.02 * before.abs().mean()  # bf16 rounding of the split weights
    embed = "model.visual.patch_embed.proj.weight"
    original, noisy = narrow.state_dict()[embed], wide.state_dict()[embed]
    assert torch.equal(noisy[:128], original) and not torch.equal(noisy[128:], original)
    train(args_for("--out", str(tmp_path / "next"), "--steps", "1", "--vision-dim", "256", "--init", str(tmp_path / "wide")))
    for argv, error in ((["--factor", "1"], "at least 2"), ([], "not a model directory")):
        source = tmp_path / ("narrow" if argv else "none")
        run = subprocess.run([sys.executable, str(tool), str(source), str(tmp_path / "no"), *argv], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and error in run.stderr and not (tmp_path / "no").exists(), run.stderr[-2000:]


def test_a_run_starts_from_an_exported_model_as_from_its_checkpoint(tmp_path):
    out = tmp_path / "model"
    train(args_for("--out", str(tmp_path / "run"), "--steps", "1", "--export", str(out)))
    model = build_model(args_for(), build_tokenizer(FAMILY.chat))
    from_ckpt = initial_weights(tmp_path / "run" / "ckpt.pt", model)
    from_export = initial_weights(out, model)
    assert from_export.keys() == from_ckpt.keys()
    for name, w in from_ckpt.items():
        assert from_export[name].dtype == torch.float32 and torch.equal(from_export[name], w.bfloat16().float()), name
    train(args_for("--out", str(tmp_path / "next"), "--steps", "1", "--init", str(out)))


def test_an_exported_model_of_another_architecture_is_refused_as_init(tmp_path, capsys):
    out = tmp_path / "model"
    train(args_for("--out", str(tmp_path / "run"), "--steps", "1", "--export", str(out)))
    with pytest.raises(ConfigError, match="rope_parameters"):  # same tensor shapes: load_state_dict alone would accept it
        train(args_for("--out", str(tmp_path / "next"), "--steps", "1", "--init", str(out), "--rope-theta", "100"))
    assert main(["train", *TINY, "--out", str(tmp_path / "other"), "--steps", "1", "--init", str(out), "--text-layers", "1"]) == 2
    assert "num_hidden_layers (2 there, 1 here)" in capsys.readouterr().err


def test_init_vision_takes_the_tower_from_one_model_and_the_rest_from_another(tmp_path):
    train(args_for("--out", str(tmp_path / "llm"), "--steps", "1"))
    eyes = tmp_path / "eyes"
    train(args_for("--out", str(tmp_path / "wide"), "--steps", "1", "--vision-dim", "32", "--seed", "5", "--export", str(eyes)))
    both = args_for("--out", str(tmp_path / "both"), "--steps", "1", "--vision-dim", "32",
                    "--init", str(tmp_path / "llm" / "ckpt.pt"), "--init-vision", str(eyes))
    weights = start_weights(both, build_model(both, build_tokenizer(FAMILY.chat)))
    llm = torch.load(tmp_path / "llm" / "ckpt.pt", weights_only=False)["model"]
    tower = Qwen2VLForConditionalGeneration.from_pretrained(eyes, torch_dtype=torch.float32).state_dict()
    assert any(k.startswith("model.visual.merger.") for k in weights)
    for name, w in weights.items():
        assert torch.equal(w, tower[name] if name.startswith("model.visual.") else llm[name]), name
    with pytest.raises(ConfigError, match="--init .*another shape.*model.visual"):  # the LLM run's 64-wide tower does not fit
        train(args_for("--out", str(tmp_path / "no"), "--steps", "1", "--vision-dim", "32", "--init", str(tmp_path / "llm" / "ckpt.pt")))
    with pytest.raises(ConfigError, match="--init-vision .*vision_config differs.*embed_dim"):
        train(args_for("--out", str(tmp_path / "no"), "--steps", "1", "--init-vision", str(eyes)))
    with pytest.raises(ConfigError, match="--init-vision .*vision_config differs.*hidden_size"):  # the merger writes the LLM's width
        train(args_for("--out", str(tmp_path / "no"), "--steps", "1", "--vision-dim", "32", "--hidden", "128", "--init-vision", str(eyes)))
    assert train(both)["step"] == 1


def test_init_vision_grows_a_shallower_tower_without_changing_what_it_computes(tmp_path, monkeypatch):
    eyes = tmp_path / "eyes"
    train(args_for("--out", str(tmp_path / "run"), "--steps", "1", "--export", str(eyes)))  # TINY: one block
    deeper = args_for("--out", str(tmp_path / "deeper"), "--steps", "1", "--vision-depth", "3", "--init-vision", str(eyes),
                      "--export", str(tmp_path / "deep"))
    model, source = build_model(deeper, build_tokenizer(FAMILY.chat)), Qwen2VLForConditionalGeneration.from_pretrained(eyes, torch_dtype=torch.float32)
    model.load_state_dict(start_weights(deeper, model))
    assert len(model.model.visual.blocks) == 3 and model.model.visual.blocks[2].mlp.fc2.weight.abs().sum() == 0
    batch, _ = make_batch(7, range(2), build_tokenizer(FAMILY.chat), image_processor(112 * 112))
    with torch.no_grad():
        grown, given = (FAMILY.vision(m)(batch["pixel_values"], grid_thw=batch["image_grid_thw"]) for m in (model, source))
    torch.testing.assert_close(grown, given)
    monkeypatch.setattr(FAMILY, "block_outputs", ("attn.proj", "mlp.down_proj"))  # names its blocks do not have
    with pytest.raises(ConfigError, match="outputs .* are not projections of its layer \\d"):
        start_weights(deeper, model)
    monkeypatch.undo()
    train(deeper)
    with pytest.raises(ConfigError, match="--init-vision .*depth \\(3 there, 1 here\\)"):  # deeper: not a growth
        train(args_for("--out", str(tmp_path / "no"), "--steps", "1", "--init-vision", str(tmp_path / "deep")))


def test_init_grows_a_shallower_llm_and_tower_without_changing_what_they_compute(tmp_path):
    source_dir = tmp_path / "source"
    train(args_for("--out", str(tmp_path / "run"), "--steps", "1", "--export", str(source_dir)))  # TINY: 2 LLM layers, 1 block
    deeper = args_for("--out", str(tmp_path / "deeper"), "--steps", "1", "--text-layers", "4", "--vision-depth", "2",
                      "--init", str(source_dir), "--export", str(tmp_path / "deep"))
    tokenizer = build_tokenizer(FAMILY.chat)
    model, source = build_model(deeper, tokenizer), Qwen2VLForConditionalGeneration.from_pretrained(source_dir, torch_dtype=torch.float32)
    model.load_state_dict(start_weights(deeper, model))
    layers = model.model.language_model.layers
    assert len(layers) == 4 and all(layers[i].self_attn.o_proj.weight.abs().sum() == 0 == layers[i].mlp.down_proj.weight.abs().sum()
                                    for i in (2, 3))
    assert layers[2].self_attn.q_proj.weight.abs().sum() > 0  # only the residual outputs are zeroed
    batch, _ = make_batch(7, range(2), tokenizer, image_processor(112 * 112))
    with torch.no_grad():
        grown, given = (m(**batch).logits for m in (model.eval(), source.eval()))
    torch.testing.assert_close(grown, given)
    assert train(deeper)["step"] == 1
    with pytest.raises(ConfigError, match="--init .*num_hidden_layers \\(4 there, 2 here\\)"):  # deeper: not a growth
        train(args_for("--out", str(tmp_path / "no"), "--steps", "1", "--init", str(tmp_path / "deep")))
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["model"]
    for lost in ("model.language_model.norm.weight", "model.language_model.layers.0.mlp.up_proj.weight"):  # not a layer on top
        torch.save({"model": {k: v for k, v in saved.items() if k != lost}}, tmp_path / "holed.pt")
        with pytest.raises(ConfigError, match=f"--init .*holed.pt: lacks tensors .*{lost}"):
            start_weights(args_for("--init", str(tmp_path / "holed.pt"), "--text-layers", "4"), model)


@pytest.mark.parametrize("seed", [2000, 3000])
def test_refuses_held_out_seeds(seed, tmp_path, capsys):
    with pytest.raises(ConfigError, match="held-out"):
        train(args_for("--out", str(tmp_path), "--seed", str(seed)))
    assert main(["train", "--out", str(tmp_path), "--seed", str(seed)]) == 2  # the CLI: a message, not a traceback
    assert "held-out" in capsys.readouterr().err


def test_vision_only_trains_the_tower_alone_and_validates_the_dense_heads(tmp_path):
    args = args_for("--out", str(tmp_path), "--steps", "2", "--aux-weight", "1", "--char-slots", "2", "--vision-only",
                    "--tasks", "read,color", "--eval-every", "2", "--eval-n", "6")
    before = build_model(args, build_tokenizer(FAMILY.chat)).state_dict()
    record = train(args)
    after = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("model.visual.") for k in moved), sorted(moved)[:5]
    assert record["loss"] == record["aux_loss"] and "val" not in record
    assert {"color", "shape", "centre", "slots"} <= record["val_probe"].keys()
    assert all(0 <= v <= 1 for v in record["val_probe"].values())


def test_probe_hits_count_right_answers_on_labelled_tokens_only():
    model = build_model(args_for(), build_tokenizer(FAMILY.chat))
    probe = VisionProbe(model, char_slots=2)
    probe.head.weight.data.zero_()
    probe.head.bias.data = torch.cat([-(torch.arange(n) - 1.0).abs() for n in probe.sizes])  # argmax: class 1 everywhere
    probe.tokens = torch.zeros(3, probe.head.in_features)
    labels = torch.tensor([[1, 0, 2, 0, 1, 1, 0],
                           [2, 0, 1, 0, 0, 1, 3],
                           [0, 0, 0, 0, 1, 0, 1]])
    assert probe.hits(labels) == {"color": (1, 2), "shape": (0, 0), "char": (1, 2), "tallest": (0, 0), "centre": (2, 2),
                                  "slots": (3, 4)}
