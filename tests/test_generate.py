"""Compression off must reproduce stock transformers exactly; LUVC must run the whole path."""
import io
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import conftest
from luvc_common.config import Limits
from luvc_common.compression.methods import method_config
from luvc_common.engine.media import Media, decode_image
from luvc_common.config import ModelConfig
from luvc_common.models.loading import load_model
from luvc_common.engine.language import Request
from luvc_common.engine.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    return Pipeline(ModelConfig(tiny_model))


@pytest.fixture(scope="module")
def stock(tiny_model):
    return load_model(ModelConfig(tiny_model), "full")


def _odd_image() -> Media:
    buf = io.BytesIO()
    Image.new("RGB", (333, 250), (240, 230, 220)).save(buf, "PNG")
    img = decode_image(buf.getvalue(), Limits())
    img.paste((200, 20, 20), (40, 60, 120, 140))
    return Media("image", [img])


def _stock_generate(stock, pipeline, media, ids, steps):
    pixels, grids = pipeline.encoder.family.patchify(media, pipeline.encoder.image_processor)
    counts = grids.prod(1).tolist()
    parts = pixels.split(counts)
    kind = [m.kind for m in media]
    pick = lambda k: (torch.cat([p for p, m in zip(parts, kind) if m == k]), grids[[m == k for m in kind]]) if k in kind else (None, None)  # noqa: E731
    images, image_grid = pick("image")
    videos, video_grid = pick("video")
    input_ids = torch.tensor([ids])
    token_type = torch.zeros_like(input_ids, dtype=torch.int)
    token_type[input_ids == stock.config.image_token_id] = 1
    token_type[input_ids == stock.config.video_token_id] = 2
    visual = dict(pixel_values=images, image_grid_thw=image_grid, pixel_values_videos=videos, video_grid_thw=video_grid)
    out = stock.generate(
        input_ids=input_ids, mm_token_type_ids=token_type, max_new_tokens=steps, do_sample=False,
        output_scores=True, return_dict_in_generate=True, **{k: v for k, v in visual.items() if v is not None},
    )
    tokens = out.sequences[0, len(ids):].tolist()
    eos = stock.config.text_config.eos_token_id
    return (tokens[: tokens.index(eos)] if eos in tokens else tokens), [s[0].float() for s in out.scores]


CASES = {
    "one image": lambda img, vid: [img],
    "two images": lambda img, vid: [img, _odd_image()],
    "video": lambda img, vid: [vid],
    "odd-sized image": lambda img, vid: [_odd_image()],
}


@pytest.mark.parametrize("case", list(CASES))
def test_compression_off_equals_stock_generate(case, pipeline, stock, demo_image, demo_video):
    media = CASES[case](demo_image, demo_video)
    encoded = pipeline.encoder.encode(media, None)
    ids = pipeline.generator.prompt_ids("What color is the circle?", encoded)
    ours, logits = conftest.generate_with_logits(pipeline.generator.engine, [Request(ids, encoded)], None, 8)
    tokens, scores = _stock_generate(stock, pipeline, media, ids, 8)
    assert len(scores) >= 2 and ours.token_ids[0] == tokens
    for a, b in zip(logits, scores):
        assert torch.allclose(a[0], b, atol=1e-4)
    # and through the public entry point
    result = pipeline.generate(media, "What color is the circle?", method_config("none"), 8)
    assert result.token_ids == tokens and result.prompt_ids == ids
    assert result.visual_tokens["llm_per_layer"] == [len(encoded.embeds)] * 4


@pytest.mark.parametrize("spec, merged", [("luvc", False), ("luvc:merges=0.5", True)])
def test_luvc_empties_the_last_layer_and_an_oim_step_halves_encoder_output(pipeline, demo_image, demo_video, spec, merged):
    for media in ([demo_image], [demo_image, demo_video]):
        none = pipeline.generate(media, "What color is the circle?", method_config("none"), 4)
        luvc = pipeline.generate(media, "What color is the circle?", method_config(spec), 4)
        assert luvc.visual_tokens["vit_patches"] == none.visual_tokens["vit_patches"]
        if merged:
            assert 2 * luvc.visual_tokens["encoder_out"] <= none.visual_tokens["encoder_out"]
            assert len(luvc.prompt_ids) < len(none.prompt_ids)
        else:
            assert luvc.visual_tokens["encoder_out"] == none.visual_tokens["encoder_out"] and luvc.prompt_ids == none.prompt_ids
        per_layer = luvc.visual_tokens["llm_per_layer"]
        assert per_layer[0] == luvc.visual_tokens["encoder_out"] and per_layer[-1] == 0
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[1] < per_layer[0]


def test_whole_path_runs_without_attention_weights(tiny_model, demo_image, demo_video):
    before = conftest.ATTENTION_CALLS["refuse_weights"]
    pipe = Pipeline(ModelConfig(tiny_model, attn_implementation="refuse_weights"))
    assert pipe.encoder.visual.config._attn_implementation == "refuse_weights"
    assert pipe.generator.engine.config._attn_implementation == "refuse_weights"
    result = pipe.generate([demo_image, demo_video], "What color is the circle?", method_config("luvc"), 3)
    assert result.visual_tokens["llm_per_layer"][-1] == 0
    assert conftest.ATTENTION_CALLS["refuse_weights"] > before


def test_cli_generate_json_contract(tmp_path):
    cmd = [sys.executable, "-m", "luvc_common.cli", "generate", "--image", str(conftest.ASSETS / "demo.png"),
           "--prompt", "What color is the circle?", "--max-new-tokens", "4", "--json"]
    runs = {m: json.loads(subprocess.run(cmd + ["--method", m], capture_output=True, text=True, check=True).stdout)
            for m in ("none", "luvc:merges=0.5")}
    for out in runs.values():
        assert set(out) >= {"model", "prompt_ids", "token_ids", "text", "visual_tokens", "timings_ms"}
        assert out["model"].endswith("luvc-tiny-qwen2vl") and len(out["visual_tokens"]["llm_per_layer"]) == 4
    assert 2 * runs["luvc:merges=0.5"]["visual_tokens"]["encoder_out"] <= runs["none"]["visual_tokens"]["encoder_out"]
    assert runs["luvc:merges=0.5"]["visual_tokens"]["llm_per_layer"][-1] == 0
