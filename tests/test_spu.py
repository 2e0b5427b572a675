import math

import pytest
import torch

import conftest
from luvc_common.compression.spu import (
    highfreq_residual,
    lowpass,
    resampled_grid,
    resampled_positions,
    select,
    spectral_resample,
    stage_layers,
)
from luvc_common.compression.config import SPUConfig
from luvc_common.compression.methods import method_config
from luvc_common.errors import ConfigError
from luvc_common.config import ModelConfig
from luvc_common.engine.pipeline import Pipeline


def test_lowpass_keeps_smooth_and_removes_checkerboard():
    h, w = 8, 10
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    smooth = torch.cos(2 * math.pi * xx / w).float()[None, ..., None]  # lowest nonzero frequency
    checker = ((yy + xx) % 2 * 2 - 1).float()[None, ..., None]  # Nyquist
    assert torch.allclose(lowpass(smooth, cutoff=0.5), smooth, atol=1e-5)
    assert lowpass(checker, cutoff=0.5).abs().max() < 1e-5
    assert torch.allclose(lowpass(torch.full((1, h, w, 3), 2.0), cutoff=0.1), torch.full((1, h, w, 3), 2.0), atol=1e-5)
    g = lowpass(checker + smooth, cutoff=0.5, window="gaussian")
    assert (g - smooth).abs().max() < (checker + smooth - smooth).abs().max()


def test_select_keeps_high_frequency_outliers_in_order():
    torch.manual_seed(0)
    grid = (1, 6, 6)
    tokens = torch.ones(36, 4) + 0.01 * torch.randn(36, 4)
    spikes = torch.tensor([3, 17, 30])
    tokens[spikes] += torch.tensor([5.0, -5.0, 5.0, -5.0])
    kept, low = select(tokens, torch.arange(36), grid, keep=3, cutoff=0.25, window="ideal", fill=None)
    assert kept.tolist() == spikes.tolist()
    residual = highfreq_residual(tokens, low)
    assert residual[spikes].min() > residual[~torch.isin(torch.arange(36), spikes)].max()


def test_select_fills_pruned_cells_from_previous_low_pass():
    torch.manual_seed(0)
    grid = (1, 4, 4)
    full = torch.randn(16, 3)
    _, low = select(full, torch.arange(16), grid, keep=8, cutoff=0.5, window="ideal", fill=None)
    survivors = torch.tensor([0, 5, 10, 15])
    kept, _ = select(full[survivors], survivors, grid, keep=2, cutoff=0.5, window="ideal", fill=low)
    assert len(kept) == 2 and kept.tolist() == sorted(kept.tolist())
    kept, _ = select(full[survivors], survivors, grid, keep=0, cutoff=0.5, window="ideal", fill=low)
    assert len(kept) == 0


def test_stage_layers_resolve_and_merge_collisions_on_shallow_llms():
    stages = ((0.17, 0.5), (0.4, 0.25), (0.67, 0.0))
    assert stage_layers(stages, 4) == {1: 0.5, 2: 0.25, 3: 0.0}
    assert stage_layers(stages, 6) == {1: 0.5, 2: 0.25, 4: 0.0}
    assert stage_layers(stages, 28) == {5: 0.5, 11: 0.25, 19: 0.0}
    # on 3 layers 0.17 and 0.4 both round to layer 1, which keeps the stricter ratio; on 2 every stage is layer 1
    assert stage_layers(stages, 3) == {1: 0.25, 2: 0.0}
    assert stage_layers(stages, 2) == {1: 0.0}
    assert stage_layers(((0.1, 0.5), (0.2, 0.0)), 4) == {1: 0.0}  # 0.1 rounds to layer 0, which is never pruned
    with pytest.raises(ConfigError, match="1-layer LLM"):
        stage_layers(SPUConfig().stages, 1)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"stages": ((0.5, 0.5),)}, "keep_ratio"),  # does not end at zero
        ({"stages": ((0.5, 0.2), (0.7, 0.4), (0.8, 0.0))}, "keep_ratio"),  # increasing
        ({"stages": ((0.5, 0.5), (0.4, 0.0))}, "depth"),
        ({"stages": ((1.0, 0.0),)}, "depth"),
        ({"stages": ()}, "spu.stages"),
        ({"stages": tuple((0.01 * i, 0.0) for i in range(1, 18))}, "spu.stages"),
        ({"cutoff": 0.0}, "spu.cutoff"),
        ({"cutoff": 1.5}, "spu.cutoff"),
        ({"window": "hann"}, "spu.window"),
    ],
)
def test_invalid_spu_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SPUConfig(**kwargs)


def test_unknown_method_is_rejected():
    with pytest.raises(ConfigError, match="method"):
        method_config("fastest")


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    return Pipeline(ModelConfig(tiny_model))


def test_counts_follow_schedule_and_text_is_untouched(pipeline, demo_image, demo_video):
    gen = pipeline.generator
    encoded = pipeline.encoder.encode([demo_image, demo_video], method_config("luvc"))
    ids = gen.prompt_ids("What color is the circle?", encoded)
    n_visual = len(encoded.embeds)
    spu_cfg = SPUConfig(stages=((0.25, 0.5), (0.5, 0.2), (0.75, 0.0)))
    state = gen.engine.prefill([_request(ids, encoded)], method_config("luvc", spu=spu_cfg))
    per_item = encoded.token_counts(2)
    expected_visual = [n_visual, *(sum(round(r * n) for n in per_item) for r in (0.5, 0.2, 0.0))]
    assert state.visual_per_layer[0] == expected_visual
    n_text = len(ids) - n_visual
    assert [int(v.sum()) - nv for v, nv in zip(state.layer_valid, expected_visual)] == [n_text] * 4
    # each layer's KV cache holds exactly the tokens that reached it
    cached = [layer.keys.shape[2] for layer in state.cache.layers]
    assert cached == [n_text + nv for nv in expected_visual]


def test_a_luvc_spec_sets_the_merges_and_the_cascade(pipeline, demo_image):
    none = pipeline.generate([demo_image], "What color is the circle?", method_config("none"), 1).visual_tokens
    spec = pipeline.generate([demo_image], "What color is the circle?", method_config("luvc:merges=none,spu=0.5:0.25/0.75:0"), 1)
    n = none["encoder_out"]
    assert spec.visual_tokens["encoder_out"] == n  # no OIM: the tower's full output crosses
    assert spec.visual_tokens["llm_per_layer"] == [n, n, round(0.25 * n), 0]
    two = pipeline.generate([demo_image], "What color is the circle?", method_config("luvc:merges=0.25/0.75,spu=none"), 1)
    assert two.visual_tokens["llm_per_layer"] == [two.visual_tokens["encoder_out"]] * 4 and two.visual_tokens["encoder_out"] <= n // 4


def _request(ids, encoded):
    from luvc_common.engine.language import Request

    return Request(ids, encoded)


@pytest.mark.parametrize("method", ["none", "luvc"])
def test_cached_decode_equals_recomputation(pipeline, demo_image, method):
    """Feeding tokens one at a time through the pruned per-layer caches gives the same logits as a
    fresh prefill of the whole pruned sequence (visual tokens precede them, so pruning is the same)."""
    gen = pipeline.generator
    cfg = method_config(method)
    encoded = pipeline.encoder.encode([demo_image], cfg)
    ids = gen.prompt_ids("What color is the circle?", encoded)
    continuation = gen.tokenizer("the circle is blue and small", add_special_tokens=False)["input_ids"]
    state = gen.engine.prefill([_request(ids, encoded)], cfg)
    for k, token in enumerate(continuation):
        cached = gen.engine.decode_step(state, torch.tensor([token]))
        fresh = gen.engine.prefill([_request(ids + continuation[: k + 1], encoded)], cfg)
        assert torch.allclose(fresh.logits, cached, atol=1e-4), f"step {k}"
    assert fresh.visual_per_layer == state.visual_per_layer


@pytest.mark.parametrize("spec", ["luvc", "fastv:keep=0.3", "dart:keep=0.3", "visionzip:keep=0.5", "random:keep=0.4"])
def test_batch_with_padding_equals_requests_alone(pipeline, demo_image, demo_video, spec):
    """Rows of different lengths, pruned differently (SPU stages, one baseline layer, or encoder cells
    dropped before layer 0), give each request's own answer."""
    gen = pipeline.generator
    cfg = method_config(spec)
    a = pipeline.encoder.encode([demo_image], cfg)
    b = pipeline.encoder.encode([demo_video], cfg)
    ra = _request(gen.prompt_ids("What color is the circle?", a), a)
    rb = _request(gen.prompt_ids("Where is the red square?", b), b)
    together, together_logits = conftest.generate_with_logits(gen.engine, [ra, rb], cfg, 6)
    (alone_a, logits_a), (alone_b, logits_b) = (conftest.generate_with_logits(gen.engine, [r], cfg, 6) for r in (ra, rb))
    assert together.token_ids == [alone_a.token_ids[0], alone_b.token_ids[0]]
    assert together.visual_per_layer == [alone_a.visual_per_layer[0], alone_b.visual_per_layer[0]]
    assert torch.allclose(together_logits[0][0], logits_a[0][0], atol=1e-4)
    assert torch.allclose(together_logits[0][1], logits_b[0][0], atol=1e-4)


def test_spectral_resample_keeps_low_frequencies_on_a_smaller_grid():
    h, w = 8, 12
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    smooth = (2 + torch.cos(2 * math.pi * xx / w)).float()[None, ..., None]
    small = spectral_resample(smooth, (4, 6))
    xs = torch.arange(6) * 2.0  # where the new tokens sample the old grid
    assert small.shape == (1, 4, 6, 1)
    assert torch.allclose(small[0, :, :, 0], (2 + torch.cos(2 * math.pi * xs / w)).expand(4, 6), atol=1e-4)
    assert torch.allclose(spectral_resample(torch.full((2, h, w, 3), 5.0), (3, 5)), torch.full((2, 3, 5, 3), 5.0), atol=1e-5)
    assert resampled_grid((2, 8, 12), keep=2 * 24) == (2, 4, 6)
    pos = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(12.0), indexing="ij"))
    new = resampled_positions(pos, (4, 6))
    assert torch.allclose(new[2, 0, 0], xs) and torch.allclose(new[1, 0, :, 0], torch.arange(4) * 2.0)
    assert torch.equal(new[0], torch.zeros(1, 4, 6))


def test_resample_mode_fuses_tokens_and_empties_the_last_layer(pipeline, demo_image, demo_video):
    gen = pipeline.generator
    cfg = method_config("luvc", spu=SPUConfig(stages=((0.17, 0.5), (0.4, 0.25), (0.67, 0.0)), mode="resample"))
    encoded = pipeline.encoder.encode([demo_image, demo_video], cfg)
    ids = gen.prompt_ids("What color is the circle?", encoded)
    out, logits = conftest.generate_with_logits(gen.engine, [_request(ids, encoded)], cfg, 4)
    counts = out.visual_per_layer[0]
    grids = [(t, h // 2, w // 2) for t, h, w in encoded.grids]
    expect = [sum(t * h * w for t, h, w in (resampled_grid(g, round(r * g[0] * g[1] * g[2])) for g in grids)) for r in (0.5, 0.25)]
    assert counts == [len(encoded.embeds), *expect, 0]
    assert torch.isfinite(logits[0]).all()
    # cached decode still equals recomputation with resampled (fused) tokens in the early caches
    state = gen.engine.prefill([_request(ids, encoded)], cfg)
    token = gen.tokenizer("blue", add_special_tokens=False)["input_ids"][0]
    cached = gen.engine.decode_step(state, torch.tensor([token]))
    fresh = gen.engine.prefill([_request(ids + [token], encoded)], cfg)
    assert torch.allclose(fresh.logits, cached, atol=1e-4)
