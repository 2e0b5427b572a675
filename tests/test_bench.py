"""`luvc bench` end to end on the tiny shape: a real encoder service process, the LLM half in-process."""
import json

import pytest

from luvc_common.cli import main

KEYS = {"method", "payload_bytes", "llm_prefill_ms", "ttft_ms", "decode_tok_s", "kv_cache_bytes", "flops_ratio", "prefill_speedup"}


def test_bench_reports_every_method(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--shape", "tiny", "--methods", "luvc,fastv:keep=0.25,tome", "--repeats", "1", "--decode-tokens", "2",
            "--image-size", "448", "--cache", str(tmp_path), "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert report["shape"] == "tiny" and list(rows) == ["none", "luvc", "fastv:keep=0.25", "tome"]
    for r in rows.values():
        assert KEYS <= set(r) and r["llm_prefill_ms_min"] <= r["llm_prefill_ms"] and r["ttft_ms"] > r["llm_prefill_ms"]
    none, luvc, fastv, tome = rows.values()
    assert none["flops_ratio"] == 1.0 and none["prefill_speedup"] == 1.0
    assert luvc["payload_bytes"] == none["payload_bytes"] and luvc["kv_cache_bytes"] < none["kv_cache_bytes"]  # OIM is off by default
    assert fastv["payload_bytes"] == none["payload_bytes"]  # fastv prunes inside the LLM: the full grid crosses
    assert tome["payload_bytes"] < none["payload_bytes"] and tome["keep_ratio"] < 1  # matched to luvc's FLOPs ratio
    assert main(["bench", "--shape", "tiny", "--methods", "luvc,bogus", "--cache", str(tmp_path)]) == 2


@pytest.mark.parametrize("flag, value", [("--repeats", "0"), ("--decode-tokens", "-1"), ("--image-size", "27"), ("--threads", "x")])
def test_bad_numeric_flags_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["bench", flag, value])
    assert exit.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err
