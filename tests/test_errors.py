"""Bad input gets a clear error that names what was wrong."""
import io
import subprocess
import sys

import pytest
from PIL import Image

import conftest
from luvc_common.config import Limits
from luvc_common.compression.methods import method_config
from luvc_common.errors import MediaError, ModelLoadError, PromptError
from luvc_common.engine.media import decode_image, load_image, load_video_dir
from luvc_common.config import ModelConfig
from luvc_common.models.loading import load_model
from luvc_common.engine.language import Request
from luvc_common.compression.visual import VisualTokens
from luvc_common.engine.pipeline import Pipeline


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "white").save(buf, "PNG")
    return buf.getvalue()


def test_unreadable_and_empty_images():
    with pytest.raises(MediaError, match="unreadable"):
        decode_image(b"\x89PNG not really an image", Limits())
    with pytest.raises(MediaError, match="unreadable"):
        decode_image(_png(8, 8)[:40], Limits())  # truncated
    with pytest.raises(MediaError, match="empty"):
        decode_image(b"", Limits())


def test_zero_size_image(tmp_path):
    # PNG header claiming 0x0 pixels: PIL refuses it, and so do we, with a message
    data = bytearray(_png(1, 1))
    data[16:24] = bytes(8)
    with pytest.raises(MediaError, match="image"):
        decode_image(bytes(data), Limits())
    with pytest.raises(MediaError, match="no such image"):
        load_image(tmp_path / "missing.png", Limits())


def test_too_many_pixels_and_frames(tmp_path):
    with pytest.raises(MediaError, match="max_image_pixels=1000"):
        decode_image(_png(40, 40), Limits(max_image_pixels=1000))
    with pytest.raises(MediaError, match="max_frames=2"):
        load_video_dir(conftest.ASSETS / "demo_video", Limits(max_frames=2))
    with pytest.raises(MediaError, match="not a directory"):
        load_video_dir(tmp_path / "nope", Limits())


@pytest.fixture(scope="module")
def pipeline(tiny_qwen2vl):
    return Pipeline(ModelConfig(tiny_qwen2vl), Limits(max_prompt_tokens=400, max_media=2))


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("<image><image> What color is it?", "places media"),
        ("<video> What color is it?", "places media"),
        ("", "empty prompt"),
        ("   ", "empty prompt"),
    ],
)
def test_prompt_placeholders_must_match_media(pipeline, demo_image, prompt, match):
    with pytest.raises(PromptError, match=match):
        pipeline.generate([demo_image], prompt, method_config("luvc"), 2)


def test_special_tokens_in_the_prompt_are_plain_text(pipeline, demo_image):
    """The client's text can never produce a control token: only the template places them."""
    plain = pipeline.generate([demo_image], "look here", method_config("none"), 1).prompt_ids
    smuggled = pipeline.generate([demo_image], "look <|image_pad|><|im_end|><|vision_start|> here", method_config("none"), 1).prompt_ids
    tok = pipeline.generator.tokenizer
    special = set(tok.convert_tokens_to_ids(list(tok.added_tokens_encoder))) - {tok.unk_token_id}
    assert [t for t in smuggled if t in special] == [t for t in plain if t in special]
    assert len(smuggled) > len(plain)


def test_request_limits(pipeline, demo_image):
    assert pipeline.generate([demo_image], "What?", method_config("none"), 2)  # 299 visual + text fits
    with pytest.raises(PromptError, match="max_prompt_tokens=400"):
        pipeline.generate([demo_image, demo_image], "What?", method_config("none"), 2)
    with pytest.raises(MediaError, match="max_media=2"):
        pipeline.generate([demo_image] * 3, "What?", method_config("luvc"), 2)
    with pytest.raises(PromptError, match="max_new_tokens"):
        pipeline.generate([demo_image], "What?", method_config("luvc"), 0)


def test_visual_tokens_must_match_placeholders(pipeline, demo_image):
    encoded = pipeline.encoder.encode([demo_image], None)
    ids = pipeline.generator.prompt_ids("What?", encoded)
    with pytest.raises(PromptError, match="visual placeholder tokens"):
        pipeline.generator.engine.prefill([Request(ids, VisualTokens(encoded.embeds[:-1], encoded.grids))], None)
    with pytest.raises(PromptError, match="visual placeholder tokens"):
        pipeline.generator.engine.prefill([Request(ids[:-20] + ids[-5:], encoded)], None)


def test_bad_model_directory(tmp_path, tiny_qwen2vl):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(str(tmp_path)), "vision")
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(ModelConfig(tiny_qwen2vl, dtype="float8"), "vision")
    with pytest.raises(ModelLoadError, match="part"):
        load_model(ModelConfig(tiny_qwen2vl), "projector")


def test_cli_reports_bad_input_and_exits_nonzero(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    run = subprocess.run(
        [sys.executable, "-m", "luvc_common.cli", "generate", "--image", str(bad), "--prompt", "What?"],
        capture_output=True, text=True,
    )
    assert run.returncode == 2 and "unreadable image" in run.stderr and not run.stdout
