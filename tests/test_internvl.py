"""InternVL through the family adapter, on tiny random checkpoints made by the repo's own writer
(112-pixel tiles of 8 x 8 patches): stock transformers equality with compression off for images and
video, OIM and SPU counts, cached decode, split loading, clear errors. Parametrised over the LLM (Qwen2
and Llama)."""
import io
import json
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.models.internvl.processing_internvl import InternVLProcessor

import conftest
from luvc_common.client import LUVCClient, image_file, video_dir
from luvc_common.compression.config import OIMConfig, SPUConfig
from luvc_common.compression.methods import method_config
from luvc_common.config import Limits, ModelConfig
from luvc_common.engine.language import Request
from luvc_common.engine.media import Media, decode_image
from luvc_common.engine.pipeline import Pipeline, encode
from luvc_common.errors import ConfigError, PromptError
from luvc_common.models.internvl import FAMILY
from luvc_common.models.loading import load_model
from luvc_common.models.tiny import save_random_checkpoint
from luvc_common.serving.launch import Service

QUESTION = "What color is the circle?"
LUVC = "luvc:merges=0.5"
"""LUVC with one OIM step (OIM is off in the default spec): these tests exercise the InternVL tower's merging."""


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny_internvl(request, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp(f"internvl-{request.param}")
    return str(save_random_checkpoint(out, "internvl", seed=1, text_model_type=request.param))


@pytest.fixture(scope="module")
def pipeline(tiny_internvl):
    return Pipeline(ModelConfig(tiny_internvl))


@pytest.fixture(scope="module")
def stock(tiny_internvl):
    return AutoModelForImageTextToText.from_pretrained(tiny_internvl, dtype=torch.float32).eval()


def _square_image() -> Media:
    """4:3, so the processor cuts 12 tiles (4 x 3) and adds a thumbnail."""
    buf = io.BytesIO()
    Image.new("RGB", (333, 250), (240, 230, 220)).save(buf, "PNG")
    img = decode_image(buf.getvalue(), Limits())
    img.paste((200, 20, 20), (40, 60, 120, 140))
    return Media("image", [img])


def _stock_generate(stock, pipeline, media, ids, steps):
    pixels, _ = pipeline.encoder.family.patchify(media, pipeline.encoder.image_processor)
    out = stock.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=steps, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    eos = stock.config.text_config.eos_token_id
    return (tokens[: tokens.index(eos)] if eos in tokens else tokens), [s[0].float() for s in out.scores]


def test_checkpoint_is_a_standard_hf_directory(tiny_internvl, stock, demo_image):
    processor = AutoImageProcessor.from_pretrained(tiny_internvl)
    assert type(processor).__name__ == "GotOcr2ImageProcessorPil" and processor.crop_to_patches
    tokenizer = AutoTokenizer.from_pretrained(tiny_internvl)
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == stock.config.image_token_id
    assert {"<img>", "</img>", "<IMG_CONTEXT>"} <= set(tokenizer.get_vocab())
    tiles = processor(images=demo_image.frames[0], return_tensors="pt")["pixel_values"]
    assert tiles.shape == (9, 3, 112, 112)  # 644 x 364: 4 x 2 tiles and the thumbnail


def test_tower_equals_stock_image_features(pipeline, stock, demo_image):
    pixels, grids = pipeline.encoder.family.patchify([demo_image, _square_image()], pipeline.encoder.image_processor)
    assert grids.tolist() == [[9, 8, 8], [13, 8, 8]]
    ours = encode(pipeline.encoder.tower, pixels, grids)
    theirs = stock.model.get_image_features(pixel_values=pixels).pooler_output.flatten(0, 1)
    assert ours.grids == [(9, 8, 8), (13, 8, 8)]
    assert torch.allclose(ours.embeds, theirs, atol=1e-5)


CASES = {"one image": lambda image, video: [image], "two images": lambda image, video: [image, _square_image()],
         "video": lambda image, video: [video], "image and video": lambda image, video: [image, video]}


@pytest.mark.parametrize("case", CASES)
def test_compression_off_equals_stock_generate(case, pipeline, stock, demo_image, demo_video):
    media = CASES[case](demo_image, demo_video)
    encoded = pipeline.encoder.encode(media, None)
    ids = pipeline.generator.prompt_ids(QUESTION, encoded)
    ours, logits = conftest.generate_with_logits(pipeline.generator.engine, [Request(ids, encoded)], None, 8)
    tokens, scores = _stock_generate(stock, pipeline, media, ids, 8)
    assert len(scores) >= 2 and ours.token_ids[0] == tokens
    for a, b in zip(logits, scores):  # float32 on ~1,000 prompt tokens: up to 3e-4 apart between runs of the suite
        assert torch.allclose(a[0], b, atol=1e-3)
    result = pipeline.generate(media, QUESTION, method_config("none"), 8)
    assert result.token_ids == tokens and result.visual_tokens["llm_per_layer"] == [len(encoded.embeds)] * 4


def test_prompt_has_one_contiguous_run_per_image(pipeline, demo_image):
    encoded = pipeline.encoder.encode([demo_image, _square_image()], None)
    tokens = pipeline.generator.tokenizer.convert_ids_to_tokens(pipeline.generator.prompt_ids(QUESTION, encoded))
    runs = " ".join(tokens).split("<img> ")[1:]
    assert [run.split(" </img>")[0].split() for run in runs] == [["<IMG_CONTEXT>"] * 9 * 16, ["<IMG_CONTEXT>"] * 13 * 16]


def test_video_prompt_is_the_processors_run_per_frame(pipeline, demo_video):
    """One `Frame{i}: <img>...</img>` run per frame, as InternVLProcessor.replace_video_token writes them
    (called directly: the processor class itself needs torchvision)."""
    encoded = pipeline.encoder.encode([demo_video], None)
    assert encoded.grids == [(4, 8, 8)] and encoded.kinds == ["video"]
    tokenizer = pipeline.generator.tokenizer
    stock = InternVLProcessor.replace_video_token(
        types.SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>", image_seq_length=16),
        {"pixel_values_videos": [torch.zeros(4)]}, 0)
    expected = tokenizer(f"user\n{stock}{QUESTION}", add_special_tokens=False)["input_ids"]
    assert pipeline.generator.prompt_ids(f"<video>{QUESTION}", encoded)[1 : 1 + len(expected)] == expected


def test_oim_at_most_halves_the_encoder_output_on_one_shared_grid(pipeline, demo_image, demo_video):
    media = [demo_image, _square_image(), demo_video]
    none = pipeline.generate(media, QUESTION, method_config("none"), 4)
    oim = pipeline.generate(media, QUESTION, method_config(LUVC, spu=None), 4)
    assert oim.visual_tokens["vit_patches"] == none.visual_tokens["vit_patches"] == 26 * 64
    assert 2 * oim.visual_tokens["encoder_out"] <= none.visual_tokens["encoder_out"]
    assert oim.visual_tokens["grids"] == [[9, 8, 4], [13, 8, 4], [4, 8, 4]]  # every tile and frame merged along w alike
    assert oim.visual_tokens["llm_per_layer"] == [oim.visual_tokens["encoder_out"]] * 4


def test_spu_counts_follow_the_schedule_and_end_at_zero(pipeline, demo_image, demo_video):
    gen = pipeline.generator
    encoded = pipeline.encoder.encode([demo_image, demo_video, _square_image()], method_config(LUVC))
    ids = gen.prompt_ids(QUESTION, encoded)
    spu = SPUConfig(stages=((0.25, 0.5), (0.5, 0.2), (0.75, 0.0)))
    state = gen.engine.prefill([Request(ids, encoded)], method_config(LUVC, spu=spu))
    per_item = encoded.token_counts(2)
    expected = [len(encoded.embeds), *(sum(round(r * n) for n in per_item) for r in (0.5, 0.2, 0.0))]
    assert state.visual_per_layer[0] == expected
    assert [layer.keys.shape[2] for layer in state.cache.layers] == [len(ids) - expected[0] + n for n in expected]
    result = pipeline.generate([demo_image], QUESTION, method_config(LUVC), 4)
    assert result.visual_tokens["llm_per_layer"][-1] == 0


@pytest.mark.parametrize("method", ["none", LUVC])
def test_cached_decode_equals_recomputation(pipeline, demo_image, demo_video, method):
    gen = pipeline.generator
    cfg = method_config(method)
    encoded = pipeline.encoder.encode([demo_image, demo_video], cfg)
    ids = gen.prompt_ids(QUESTION, encoded)
    continuation = gen.tokenizer("the circle is blue", add_special_tokens=False)["input_ids"]
    state = gen.engine.prefill([Request(ids, encoded)], cfg)
    for k, token in enumerate(continuation):
        cached = gen.engine.decode_step(state, torch.tensor([token]))
        fresh = gen.engine.prefill([Request(ids + continuation[: k + 1], encoded)], cfg)
        assert torch.allclose(fresh.logits, cached, atol=1e-4), f"step {k}"


def test_source_llm_positions_are_refused_for_1d_rope(pipeline, demo_image):
    cfg = method_config(LUVC, oim=OIMConfig(llm_positions="source"))
    encoded = pipeline.encoder.encode([demo_image], cfg)
    with pytest.raises(ConfigError, match='oim.llm_positions="source" is not supported for internvl'):
        pipeline.generator.engine.prefill([Request(pipeline.generator.prompt_ids(QUESTION, encoded), encoded)], cfg)
    assert pipeline.generate([demo_image], QUESTION, method_config(LUVC), 2).token_ids  # and the engine still serves


def test_batch_with_padding_equals_requests_alone(pipeline, demo_image):
    """1D positions count from each row's first real token, so left padding changes nothing."""
    gen = pipeline.generator
    cfg = method_config(LUVC)
    a = pipeline.encoder.encode([demo_image], cfg)
    b = pipeline.encoder.encode([_square_image()], cfg)
    ra, rb = Request(gen.prompt_ids(QUESTION, a), a), Request(gen.prompt_ids("Where is the red square?", b), b)
    together = gen.engine.generate([ra, rb], cfg, 4)
    alone = [gen.engine.generate([r], cfg, 4) for r in (ra, rb)]
    assert together.token_ids == [alone[0].token_ids[0], alone[1].token_ids[0]]


def test_halves_load_only_their_own_weights(tiny_internvl):
    vision = load_model(ModelConfig(tiny_internvl), "vision")
    language = load_model(ModelConfig(tiny_internvl), "language")
    vision_names = {n for n, _ in vision.named_parameters()}
    language_names = {n for n, _ in language.named_parameters()}
    assert vision_names and all(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in vision_names)
    assert language_names and not any("vision_tower" in n or "multi_modal_projector" in n for n in language_names)


def test_bad_input_gets_a_clear_error(pipeline, demo_image, demo_video):
    encoded = pipeline.encoder.encode([demo_image], None)
    ids = pipeline.generator.prompt_ids(QUESTION, encoded)
    start = ids.index(pipeline.generator.tokenizer.convert_tokens_to_ids("<img>")) + 1
    with pytest.raises(PromptError, match="placeholder tokens"):
        pipeline.generator.engine.prefill([Request(ids[:start] + ids[start + 1 :], encoded)], None)
    with pytest.raises(PromptError, match="contiguous"):
        split = ids[: start + 5] + [ids[1]] + ids[start + 5 : -1]
        pipeline.generator.engine.prefill([Request(split, encoded)], None)
    video = pipeline.encoder.encode([demo_video], None)
    ids = pipeline.generator.prompt_ids(QUESTION, video)
    context = pipeline.generator.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    at = ids.index(context)
    one_run = ids[:at] + [context] * 64 + [i for i in ids[at:] if i != context]
    with pytest.raises(PromptError, match="runs of \\[16, 16, 16, 16\\]"):
        pipeline.generator.engine.prefill([Request(one_run, video)], None)


def test_canonical_key_maps_the_transformers_4_layout():
    assert FAMILY.canonical_key("language_model.model.layers.0.mlp.up_proj.weight") == "model.language_model.layers.0.mlp.up_proj.weight"
    assert FAMILY.canonical_key("language_model.lm_head.weight") == "lm_head.weight"
    assert FAMILY.canonical_key("vision_tower.embeddings.cls_token") == "model.vision_tower.embeddings.cls_token"
    assert FAMILY.canonical_key("multi_modal_projector.linear_1.bias") == "model.multi_modal_projector.linear_1.bias"
    assert FAMILY.canonical_key("model.language_model.norm.weight") == "model.language_model.norm.weight"


def test_cli_generate_on_an_internvl_directory(tiny_internvl):
    cmd = [sys.executable, "-m", "luvc_common.cli", "generate", "--model", tiny_internvl, "--image",
           str(conftest.ASSETS / "demo.png"), "--prompt", QUESTION, "--max-new-tokens", "4", "--json"]
    runs = {m: json.loads(subprocess.run(cmd + ["--method", m], capture_output=True, text=True, check=True).stdout)
            for m in ("none", LUVC)}
    assert 2 * runs[LUVC]["visual_tokens"]["encoder_out"] <= runs["none"]["visual_tokens"]["encoder_out"]
    assert runs[LUVC]["visual_tokens"]["llm_per_layer"][-1] == 0


@pytest.mark.parametrize("spec, keep", [("fastv:keep=0.3", 0.3), ("dart:keep=0.3", 0.3), ("pool:keep=0.25", 0.25),
                                        ("random:keep=0.4", 0.4), ("tome:keep=0.25", 0.25), ("visionzip:keep=0.5", 0.5)])
def test_baselines_keep_their_budget(pipeline, demo_image, spec, keep):
    full = len(pipeline.encoder.encode([demo_image], None).embeds)
    result = pipeline.generate([demo_image], QUESTION, method_config(spec), 3)
    last = result.visual_tokens["llm_per_layer"][-1]
    assert abs(last - keep * full) <= 9  # per-tile rounding (tome) on 9 tiles
    assert result.token_ids


def test_proportional_block_without_sizes_is_the_block(pipeline, demo_image):
    """ToMe's block with all sizes 1 (zero bias) is the stock block, the tile's CLS token included."""
    tower = pipeline.encoder.tower
    pixels, grids = pipeline.encoder.family.patchify([demo_image], pipeline.encoder.image_processor)
    tokens = tower.embed(pixels[:1], torch.tensor([[1, 8, 8]]))
    stock = tower.run_blocks(tokens, range(1))
    ours = tower.proportional_block(0, tokens.hidden, tokens.positions, torch.zeros(64))
    assert torch.allclose(ours, stock, atol=1e-5)


def test_spu_resample_mode_on_1d_positions(pipeline, demo_image, demo_video):
    """A video's frames are separate runs; its resampled tokens take the place of its first run."""
    gen = pipeline.generator
    cfg = method_config(LUVC, spu=SPUConfig(mode="resample"))
    encoded = pipeline.encoder.encode([demo_image, demo_video], cfg)
    ids = gen.prompt_ids(QUESTION, encoded)
    state = gen.engine.prefill([Request(ids, encoded)], cfg)
    assert state.visual_per_layer[0][0] == len(encoded.embeds) and state.visual_per_layer[0][-1] == 0
    token = gen.tokenizer("blue", add_special_tokens=False)["input_ids"][0]
    cached = gen.engine.decode_step(state, torch.tensor([token]))
    fresh = gen.engine.prefill([Request(ids + [token], encoded)], cfg)
    assert torch.allclose(fresh.logits, cached, atol=1e-4)


def test_services_serve_it_unchanged(tiny_internvl, pipeline, demo_image, demo_video, tmp_path):
    """The encoder and LLM services on an InternVL directory: the in-process answer (the tile and frame
    grids crossed the wire) and a LUVC payload of at most half."""
    encoder = Service(["encoder", "--model", tiny_internvl], tmp_path / "encoder.log").start()
    llm = Service(["llm", "--model", tiny_internvl, "--encoder", encoder.target], tmp_path / "llm.log").start()
    try:
        with LUVCClient(llm.target) as client:
            media = [image_file(conftest.ASSETS / "demo.png"), video_dir(conftest.ASSETS / "demo_video")]
            remote = {m: client.generate(QUESTION, media, method=m, max_new_tokens=6, wire_dtype="FP32", timeout=120)
                      for m in ("none", LUVC)}
    finally:
        llm.stop()
        encoder.stop()
    for method, answer in remote.items():
        local = pipeline.generate([demo_image, demo_video], QUESTION, method_config(method), 6)
        assert list(answer.token_ids) == local.token_ids and list(answer.llm_per_layer) == local.visual_tokens["llm_per_layer"]
    assert 2 * remote[LUVC].payload_bytes <= remote["none"].payload_bytes


def test_bench_shape_has_internvl3_1b_sizes():
    from luvc_common.models.tokenizer import build_tokenizer
    from luvc_common.research.bench import SHAPES

    shape = SHAPES["internvl-1b"]
    config = FAMILY.tiny_config(build_tokenizer(FAMILY.chat), text_overrides=shape["text"], vision_overrides=shape["vision"])
    assert config.vision_config.image_size == (448, 448) and config.image_seq_length == 256
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1024, 24)
    assert (config.text_config.model_type, config.text_config.hidden_size, config.text_config.num_hidden_layers) == ("qwen2", 896, 24)
    assert "mrope_section" not in config.text_config.rope_parameters


def _fastv_scores_and_eager_weights(model_dir, image, monkeypatch):
    pipe = Pipeline(ModelConfig(model_dir, attn_implementation="eager"))
    engine = pipe.generator.engine
    encoded = pipe.encoder.encode([image], None)
    ids = pipe.generator.prompt_ids(QUESTION, encoded)
    eager, recomputed = [], []
    original = engine.family.last_query_attention
    monkeypatch.setattr(engine.family, "last_query_attention", lambda *a: recomputed.append(original(*a)) or recomputed[-1])
    hook = engine.lm.layers[1].self_attn.register_forward_hook(lambda _m, _a, out: eager.append(out[1][:, :, -1].float()))
    try:  # K = round(0.5 * 4) = 2: scores from layer 1
        engine.prefill([Request(ids, encoded)], method_config("fastv:keep=0.5,layer=0.5"))
    finally:
        hook.remove()
    return recomputed, eager


def test_fastv_scores_equal_eager_attention_weights(tiny_internvl, demo_image, monkeypatch):
    recomputed, eager = _fastv_scores_and_eager_weights(tiny_internvl, demo_image, monkeypatch)
    assert len(recomputed) == 1 and torch.allclose(recomputed[0], eager[0], atol=1e-5)


def test_qwen3_text_model_with_its_query_norm(tmp_path, demo_image, monkeypatch):
    """InternVL3.5's LLM is Qwen3 (RMS norm on queries and keys): stock equality and FastV's scores."""
    model_dir = str(save_random_checkpoint(tmp_path, "internvl", seed=1, text_model_type="qwen3"))
    recomputed, eager = _fastv_scores_and_eager_weights(model_dir, demo_image, monkeypatch)
    assert len(recomputed) == 1 and torch.allclose(recomputed[0], eager[0], atol=1e-5)
    pipe = Pipeline(ModelConfig(model_dir))
    stock = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoded = pipe.encoder.encode([demo_image], None)
    ids = pipe.generator.prompt_ids(QUESTION, encoded)
    assert pipe.generate([demo_image], QUESTION, method_config("none"), 6).token_ids == _stock_generate(stock, pipe, [demo_image], ids, 6)[0]


def test_attention_received_equals_eager_weights(tiny_internvl, demo_image):
    """VisionZip's saliency per tile: eager attention of the block, averaged over heads and queries."""
    pipe = Pipeline(ModelConfig(tiny_internvl, attn_implementation="eager"))
    tower = pipe.encoder.tower
    pixels, grids = pipe.encoder.family.patchify([demo_image], pipe.encoder.image_processor)
    tokens = tower.embed(pixels, grids)
    x = tower.run_blocks(tokens, range(tower.depth - 1))
    weights = []
    hook = tower.vit.encoder.layer[-1].attention.register_forward_hook(lambda _m, _a, out: weights.append(out[1]))
    try:
        tower.run_blocks(type(tokens)(x, tokens.sizes, tokens.positions, tokens.grids), range(tower.depth - 1, tower.depth))
    finally:
        hook.remove()
    expected = weights[0].float().mean(dim=(1, 2))[:, 1:].reshape(-1)
    assert torch.allclose(tower.attention_received(tower.depth - 1, x, tokens.positions), expected, atol=1e-6)


@pytest.mark.parametrize("size", [(448, 448), (1000, 300), (200, 900), (64, 64)])
def test_patch_count_from_the_header_equals_patchify(pipeline, size):
    """The encoder's max_vit_patches check, made before decoding, counts every tile and the thumbnail."""
    from luvc_common.engine.media import MediaFiles, probe_image

    buf = io.BytesIO()
    Image.new("RGB", size, "white").save(buf, "PNG")
    encoder = pipeline.encoder
    files = [MediaFiles("image", [probe_image(buf.getvalue(), Limits(), "x")])]
    _, grids = encoder.family.patchify(encoder.decode(files, Limits()), encoder.image_processor)
    assert encoder.patches(files) == int(grids.prod(1).sum())
