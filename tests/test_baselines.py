"""Baseline methods: the pure decisions, their budgets on real (tiny) models, and equality with
"none" at a full budget."""
from dataclasses import fields

import pytest
import torch

import conftest

from luvc_common.compression import baselines as B
from luvc_common.compression.config import OIMConfig, SPUConfig
from luvc_common.compression.methods import budgeted, get, method_config, method_spec
from luvc_common.errors import ConfigError
from luvc_common.compression.flops import flops_ratio, matched_keep_ratio
from luvc_common.config import ModelConfig
from luvc_common.models.family import get_family
from luvc_common.models.tiny import save_random_checkpoint
from luvc_common.engine.language import Request
from luvc_common.engine.pipeline import Pipeline
from luvc_common.models.tokenizer import build_tokenizer

PROMPT = "What color is the circle?"
BASELINES = budgeted()
VISION_BASELINES = [m for m in BASELINES if get(m).in_encoder]
LLM_BASELINES = [m for m in BASELINES if not get(m).in_encoder]


def test_bipartite_matching_merges_the_most_similar_a_tokens_into_b():
    metric = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [1.0, 0.01], [0.0, 1.0], [0.2, 1.0]])
    # A = tokens 0, 2, 4; B = 1, 3, 5. Best links: 0->3 (~1.0), 4->1 (1.0), 2->3 (~0.99)
    src, dst = B.bipartite_soft_matching(metric, 2)
    assert set(zip(src.tolist(), dst.tolist())) == {(0, 3), (4, 1)}
    src, dst = B.bipartite_soft_matching(metric, 3)
    assert (src % 2 == 0).all() and (dst % 2 == 1).all() and len(src) == 3


def test_merge_into_is_size_weighted():
    x = torch.tensor([[2.0], [10.0], [4.0]])
    sizes = torch.tensor([1.0, 3.0, 1.0])
    merged, new_sizes, kept = B.merge_into(x, sizes, torch.tensor([0]), torch.tensor([1]))
    assert kept.tolist() == [1, 2] and new_sizes.tolist() == [4.0, 1.0]
    assert merged[:, 0].tolist() == pytest.approx([(2 * 1 + 10 * 3) / 4, 4.0])


@pytest.mark.parametrize("n, keep, blocks", [(100, 25, 4), (64, 8, 4), (64, 4, 4), (10, 9, 3), (16, 1, 4), (7, 7, 2), (300, 19, 4)])
def test_tome_schedule_reaches_the_budget_when_it_can(n, keep, blocks):
    sched = B.tome_schedule(n, keep, blocks)
    left = n
    for r in sched:
        assert 0 <= r <= left // 2
        left -= r
    assert left == keep or keep < -(-n // 2**blocks)


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest_into_targets():
    x = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 2)
    saliency = torch.tensor([0, 9, 0, 0, 8, 0, 0, 0], dtype=torch.float32)
    metric = torch.tensor([[1.0, 0]] * 4 + [[0, 1.0]] * 4)
    merged, kept = B.visionzip_merge(x, saliency, metric, dominant=2, contextual=2)
    assert kept.tolist() == [0, 1, 4, 7]  # dominant 1, 4; targets spread over the rest: 0 and 7
    assert merged[1].tolist() == [1.0, 1.0] and merged[2].tolist() == [4.0, 4.0]
    assert merged[0, 0].item() == pytest.approx(0 + (2 + 3) / 2)  # target 0 + mean of its similar tokens 2, 3
    assert merged[3, 0].item() == pytest.approx(7 + (5 + 6) / 2)


def test_fastv_keeps_the_most_attended_tokens():
    attention = torch.tensor([[0.1, 0.5, 0.0, 0.4], [0.3, 0.3, 0.0, 0.4]])
    assert B.fastv_keep(attention, 2).tolist() == [1, 3]


def test_dart_drops_duplicates_of_the_pivots():
    pivot = torch.tensor([1.0, 0.0, 0.0])
    hidden = torch.stack([pivot * 3, pivot, pivot * 2, torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]), pivot])
    keys = hidden.clone()  # token 0 has the largest key L1 norm: the image pivot
    kept = B.dart_keep(keys, keys[:0], hidden, hidden[:0], keep=3, image_pivots=1, text_pivots=0)
    assert kept.tolist() == [0, 3, 4]  # the pivot and the two tokens unlike it; its copies go


def test_random_keep_is_reproducible_and_uniform_without_replacement():
    a, b = B.random_keep(50, 10, seed=3), B.random_keep(50, 10, seed=3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10 and a.tolist() == sorted(a.tolist())
    assert a.tolist() != B.random_keep(50, 10, seed=4).tolist()


@pytest.mark.parametrize("start", [0, 1, 5])
def test_matched_keep_ratio_hits_the_target(start):
    qwen2_vl = get_family("qwen2_vl")
    text = qwen2_vl.tiny_config(build_tokenizer(qwen2_vl.chat), text_layers=8).text_config
    k = matched_keep_ratio(2.0, 30, 400, text, 8, start)
    base = [430] * 8
    got = flops_ratio(base, base[:start] + [30 + round(k * 400)] * (8 - start), text)
    assert got == pytest.approx(2.0, rel=0.02) or (start == 5 and k == pytest.approx(1 / 400))


def test_method_specs():
    assert method_config("tome:keep=0.125").baseline.keep_ratio == 0.125
    assert method_config("dart:keep=0.3,layer=0.5").baseline.layer == 0.5
    assert method_config("random:seed=7").baseline.seed == 7
    luvc = method_config("luvc:merges=0.25/0.75,axis=h,llm_positions=source,spu=0.5:0.25/0.75:0,cutoff=0.3,mode=resample")
    assert luvc.oim == OIMConfig(merge_depths=(0.25, 0.75), first_axis="h", llm_positions="source")
    assert luvc.spu == SPUConfig(stages=((0.5, 0.25), (0.75, 0.0)), cutoff=0.3, mode="resample")
    assert method_config("luvc:merges=none").oim is None and method_config("luvc:spu=none").spu is None
    assert method_config("luvc").oim is None and method_config("luvc").spu == SPUConfig()  # OIM is off by default
    assert method_config("luvc:axis=h").oim == OIMConfig(first_axis="h")  # any OIM knob turns it on
    assert method_spec(method_config("luvc:axis=h")) == "luvc:merges=0.5,axis=h"
    assert set(get("luvc").spec_keys.values()) == {f.name for f in fields(OIMConfig) + fields(SPUConfig)}  # every knob
    for spec in ("none", "luvc", "tome", "dart:keep=0.3,layer=0.5", "random:keep=0.125,seed=7", "visionzip:dominant=0.5",
                 "luvc:merges=none", "luvc:merges=0.5", "luvc:axis=h", "luvc:spu=none,positions=grid", "luvc:merges=0.5/0.5,window=gaussian,spu=0.1:0.9/0.2:0"):
        assert method_config(method_spec(method_config(spec))) == method_config(spec)
    assert method_spec(luvc) == "luvc:merges=0.25/0.75,axis=h,llm_positions=source,spu=0.5:0.25/0.75:0.0,cutoff=0.3,mode=resample"
    for bad, words in [("tome:keep=0", "keep_ratio"), ("luvc:keep=0.5", "name[:key=value"), ("fastv:bogus=1", "keys"),
                       ("pool:keep=half", "not a number"), ("tomee", "one of"), ("luvc:merges=", "depths joined"),
                       ("luvc:spu=0.5", "stages joined"), ("luvc:spu=0.5:0.5", "keep_ratio 0"), ("luvc:axis=t", "oim.first_axis"),
                       ("luvc:merges=none,axis=h", "merges=none turns oim off, so axis"), ("luvc:cutoff=nan", "spu.cutoff"),
                       ("luvc:merges=" + "/".join(["0.5"] * 17), "1 to 16 steps")]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
            method_config(bad)


@pytest.fixture(scope="module")
def pipeline(tiny_qwen2vl):
    return Pipeline(ModelConfig(tiny_qwen2vl))


def _expected_counts(method, keep, n_items, layers):
    """Visual tokens entering each LLM layer for a baseline at `keep` on items of n_items tokens."""
    kept = sum(B.keep_count(n, keep) for n in n_items)
    if method in VISION_BASELINES:
        return [kept] * layers
    k = max(1, round(method_config(method).baseline.layer * layers))
    return [sum(n_items)] * k + [kept] * (layers - k)


@pytest.mark.parametrize("method", [m for m in BASELINES if m != "pool"])
def test_baselines_keep_their_budget(pipeline, demo_image, demo_video, method):
    none = pipeline.generate([demo_image, demo_video], PROMPT, method_config("none"), 2)
    n_items = [t * h * w // 4 for t, h, w in none.visual_tokens["grids"]]
    result = pipeline.generate([demo_image, demo_video], PROMPT, method_config(f"{method}:keep=0.3"), 2)
    layers = len(none.visual_tokens["llm_per_layer"])
    assert result.visual_tokens["llm_per_layer"] == _expected_counts(method, 0.3, n_items, layers)
    assert result.prompt_ids == none.prompt_ids  # placeholders for the full grid: stock M-RoPE positions
    crossing = result.visual_tokens["encoder_out"]
    assert crossing == (result.visual_tokens["llm_per_layer"][0] if method in VISION_BASELINES else sum(n_items))


def test_pool_halves_the_grid_per_step(pipeline, demo_image):
    none = pipeline.generate([demo_image], PROMPT, method_config("none"), 1).visual_tokens
    pooled = pipeline.generate([demo_image], PROMPT, method_config("pool:keep=0.25"), 1).visual_tokens
    (t, h, w), (_, ph, pw) = none["grids"][0], pooled["grids"][0]
    assert (ph // 2, pw // 2) == (max(1, h // 2 // 2), max(1, w // 2 // 2))
    assert pooled["llm_per_layer"] == [t * ph * pw // 4] * len(none["llm_per_layer"])


@pytest.mark.parametrize("method", [m for m in BASELINES if m != "pool"])  # pool's smallest step halves
def test_full_budget_equals_uncompressed(pipeline, demo_image, demo_video, method):
    """keep=1 keeps every token (tome: nothing to merge, proportional attention with sizes 1; fastv:
    the eager layer computes what sdpa does), so the answer and its logits are "none"'s."""
    media = [demo_image, demo_video]
    gen = pipeline.generator
    results = {}
    for spec in ("none", f"{method}:keep=1"):
        cfg = method_config(spec)
        encoded = pipeline.encoder.encode(media, cfg)
        ids = gen.prompt_ids(PROMPT, encoded)
        results[spec] = conftest.generate_with_logits(gen.engine, [Request(ids, encoded)], cfg, 4)
    (a, a_logits), (b, b_logits) = results.values()
    assert a.token_ids == b.token_ids and a.visual_per_layer == b.visual_per_layer
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a_logits, b_logits))


def test_fastv_never_asks_the_kernel_for_attention_weights(tiny_qwen2vl, demo_image):
    """FastV's scores are recomputed from layer K-1's input and cached keys, so it runs on a kernel that
    returns no weights (like FlashAttention) and gives what it gives on sdpa."""
    sdpa = Pipeline(ModelConfig(tiny_qwen2vl))
    blind = Pipeline(ModelConfig(tiny_qwen2vl, attn_implementation="refuse_weights"))
    spec = method_config("fastv:keep=0.5,layer=0.5")
    calls = conftest.ATTENTION_CALLS["refuse_weights"]
    a, b = (p.generate([demo_image], PROMPT, spec, 4) for p in (sdpa, blind))
    assert conftest.ATTENTION_CALLS["refuse_weights"] > calls
    assert a.token_ids == b.token_ids and a.visual_tokens["llm_per_layer"] == b.visual_tokens["llm_per_layer"]


def test_fastv_scores_equal_eager_attention_weights(tiny_qwen2vl, demo_image, monkeypatch):
    """The recomputed last-query row equals what eager attention returns in layer K-1."""
    pipe = Pipeline(ModelConfig(tiny_qwen2vl, attn_implementation="eager"))
    engine = pipe.generator.engine
    encoded = pipe.encoder.encode([demo_image], None)
    ids = pipe.generator.prompt_ids(PROMPT, encoded)
    eager, recomputed = [], []
    original = engine.family.last_query_attention
    monkeypatch.setattr(engine.family, "last_query_attention", lambda *a: recomputed.append(original(*a)) or recomputed[-1])
    hook = engine.lm.layers[1].self_attn.register_forward_hook(lambda _m, _a, out: eager.append(out[1][:, :, -1].float()))
    try:  # K = round(0.5 * 4) = 2: scores from layer 1
        engine.prefill([Request(ids, encoded)], method_config("fastv:keep=0.5,layer=0.5"))
    finally:
        hook.remove()
    assert len(recomputed) == 1 and torch.allclose(recomputed[0], eager[0], atol=1e-5)


def test_tome_refuses_windowed_towers(tmp_path, demo_image):
    pipe = Pipeline(ModelConfig(str(save_random_checkpoint(tmp_path, "qwen2_5_vl", seed=1))))
    with pytest.raises(ConfigError, match="window attention"):
        pipe.generate([demo_image], PROMPT, method_config("tome"), 1)


@pytest.mark.parametrize("method", LLM_BASELINES)
def test_llm_baselines_refuse_a_layer_past_the_model(pipeline, demo_image, method):
    with pytest.raises(ConfigError, match="layer"):
        pipeline.generate([demo_image], PROMPT, method_config(f"{method}:layer=0.95"), 1)
