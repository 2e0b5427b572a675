"""Compression off must reproduce stock transformers exactly; LUVC must run the whole path."""
import io
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import conftest
from luvc_common.config import DEFAULT_MODEL, Limits
from luvc_common.errors import ConfigError
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
    layers = json.loads((DEFAULT_MODEL / "config.json").read_text())["text_config"]["num_hidden_layers"]
    cmd = [sys.executable, "-m", "luvc_common.cli", "generate", "--image", str(conftest.ASSETS / "demo.png"),
           "--prompt", "What color is the circle?", "--max-new-tokens", "4", "--json"]
    runs = {m: json.loads(subprocess.run(cmd + ["--method", m], capture_output=True, text=True, check=True).stdout)
            for m in ("none", "luvc:merges=0.5")}
    for out in runs.values():
        assert set(out) >= {"model", "prompt_ids", "token_ids", "text", "visual_tokens", "timings_ms"}
        assert out["model"] == str(DEFAULT_MODEL) and len(out["visual_tokens"]["llm_per_layer"]) == layers
    assert 2 * runs["luvc:merges=0.5"]["visual_tokens"]["encoder_out"] <= runs["none"]["visual_tokens"]["encoder_out"]
    assert runs["luvc:merges=0.5"]["visual_tokens"]["llm_per_layer"][-1] == 0


def _stock_checkpoint(out, family: str, text_layers: int):
    """A checkpoint written by stock transformers alone, unlike save_random_checkpoint: other widths and rotary
    split, an untied head in sharded float32 files, and the processor config's older min/max_pixels keys."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, \
        Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(conftest.ASSETS.parent / "models" / "luvc-tiny-qwen2vl")
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=160, num_hidden_layers=text_layers,
                num_attention_heads=3, num_key_value_heads=1,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
    vision = dict(depth=2, num_heads=3, patch_size=14, spatial_merge_size=2)
    config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    if family == "qwen2_5_vl":
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision.update(hidden_size=48, intermediate_size=96, out_hidden_size=96, window_size=56, fullatt_block_indexes=[1])
    else:
        vision.update(embed_dim=48, hidden_size=96, mlp_ratio=2)
    config = config_class(text_config=text, vision_config=vision, tie_word_embeddings=False,
                          image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                          vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(3)
    model_class(config).save_pretrained(out, max_shard_size="300KB")
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil().save_pretrained(out)
    processor = json.loads((out / "preprocessor_config.json").read_text())
    del processor["size"]
    processor.update(min_pixels=3136, max_pixels=200704)
    (out / "preprocessor_config.json").write_text(json.dumps(processor))
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


@pytest.mark.parametrize("family, text_layers", [("qwen2_vl", 3), ("qwen2_5_vl", 2)])
def test_a_shallow_checkpoint_saved_by_stock_transformers_runs_every_method(tmp_path, family, text_layers, demo_image):
    from luvc_common.compression.methods import NAMES

    pipe = Pipeline(ModelConfig(str(_stock_checkpoint(tmp_path, family, text_layers))))
    assert pipe.generator.engine.num_layers == text_layers
    none = pipe.generate([demo_image], "What color is the circle?", method_config("none"), 3)
    assert none.visual_tokens["llm_per_layer"] == [none.visual_tokens["encoder_out"]] * text_layers
    for name in NAMES:
        if family == "qwen2_5_vl" and name == "tome":  # merges across windows: refused by design
            with pytest.raises(ConfigError, match="window attention"):
                pipe.generate([demo_image], "What color is the circle?", method_config(name), 3)
            continue
        result = pipe.generate([demo_image], "What color is the circle?", method_config(name), 3)
        assert len(result.token_ids) == 3, name
        if name == "luvc":  # the default stages collide on these depths and collapse; the last layer is still empty
            assert result.visual_tokens["llm_per_layer"][-1] == 0 < result.visual_tokens["llm_per_layer"][0]
    merged = pipe.generate([demo_image], "What color is the circle?", method_config("luvc:merges=0.5"), 3)
    assert merged.visual_tokens["llm_per_layer"][-1] == 0 < merged.visual_tokens["llm_per_layer"][0]


def test_transparent_images_are_seen_on_white_as_stock_processors_see_them():
    """A transparent background stored as black must not reach the model as black (RGB conversion alone does that)."""
    rgba = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    rgba.paste((200, 20, 20, 255), (10, 10, 30, 30))
    for img in (rgba, rgba.convert("LA"), rgba.convert("P")):
        if img.mode == "P":
            img.info["transparency"] = img.getpixel((0, 0))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        rgb = decode_image(buf.getvalue(), Limits())
        assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255), img.mode
        assert rgb.getpixel((20, 20)) == img.convert("RGB").getpixel((20, 20)), img.mode
