"""The evaluation harness: FLOPs accounting, scoring, and `luvc eval` end to end on a tiny model."""
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from luvc_common.cli import main
from luvc_common.config import SPUConfig, method_config
from luvc_common.evaluate import config_label, evaluate, score
from luvc_common.flops import flops_ratio, layer_flops, prefill_flops, uncompressed_tokens_per_layer
from luvc_common.synthvqa import load_jsonl, write_dataset

CONFIG = SimpleNamespace(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=10)


def test_layer_flops_by_hand():
    d, m, q, kv, n = 8, 16, 8, 4, 5
    linear = 2 * n * (d * q + 2 * d * kv + q * d + 3 * d * m)
    assert layer_flops(n, CONFIG) == linear + 4 * n * n * q
    assert prefill_flops([n, 3], CONFIG) == layer_flops(n, CONFIG) + layer_flops(3, CONFIG) + 2 * d * 10


def test_flops_ratio_orders_methods():
    base = uncompressed_tokens_per_layer(10, [(1, 8, 8), (2, 4, 4)], num_layers=3)
    assert base == [10 + 16 + 8] * 3
    assert flops_ratio(base, base, CONFIG) == 1.0
    assert flops_ratio(base, [26, 18, 10], CONFIG) > 1.0 > flops_ratio([26, 18, 10], base, CONFIG)


def test_score_normalises_and_splits_by_task():
    result = score(["color", "color", "read", "chart"], ["Blue.", "red", " 417 ", "b"], ["blue", "green", "417", "B"])
    assert result == {"accuracy": 0.75, "per_task": {"color": 0.5, "read": 1.0, "chart": 1.0}, "n": 4}


def test_config_labels_name_what_differs():
    assert config_label(method_config("luvc")) == "luvc"
    assert config_label(method_config("luvc", spu=None)) == "luvc[spu=off]"
    assert "spu.mode=resample" in config_label(method_config("luvc", spu=SPUConfig(mode="resample")))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth"), 6, seed=5)


def test_evaluate_reports_every_method_against_none(tiny_qwen2vl, data):
    luvc = method_config("luvc")
    report = evaluate(tiny_qwen2vl, load_jsonl(data), {"luvc": luvc, "luvc-resample": replace(luvc, spu=SPUConfig(mode="resample"))},
                      progress=False, max_new_tokens=3)
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == ["none", "luvc", "luvc-resample"] and report["n"] == 6
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and set(r["per_task"]) <= {"color", "shape", "count", "position", "read", "chart"}
        assert r["n"] == 6 and r["llm_prefill_speedup"] > 0
    assert results["none"]["llm_flops_ratio"] == pytest.approx(1.0)
    assert results["luvc"]["visual_tokens_llm_in"] < results["none"]["visual_tokens_llm_in"] / 1.9
    assert results["luvc"]["llm_flops_ratio"] > 2.0
    assert results["luvc"]["visual_tokens_per_layer"][-1] == 0


def test_cli_writes_json_and_plot(tiny_qwen2vl, data, tmp_path):
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    args = ["eval", "--data", str(data), "--model", tiny_qwen2vl, "--methods", "luvc", "--limit", "3", "--json", str(out), "--plot", str(png)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["none", "luvc"]
    assert {"method", "accuracy", "per_task", "n", "visual_tokens_llm_in", "llm_flops_ratio", "llm_prefill_speedup"} <= set(report["results"][0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "--data", str(tmp_path / "missing.jsonl"), "--model", tiny_qwen2vl]) == 2
