"""The LLM stage on a real local Ray instance (2 CPUs) behind Ray Serve's gRPC proxy."""
import signal
import threading
import time
import urllib.request
from typing import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

ray = pytest.importorskip("ray", reason="the ray extra is not installed")  # installed by `make test`
from ray import serve  # noqa: E402

import conftest  # noqa: E402
from luvc_common.client import ClientOptions, LUVCClient, image_file  # noqa: E402
from luvc_common.compression.methods import method_config  # noqa: E402
from luvc_common.serving.launch import Service, free_port  # noqa: E402
from luvc_common.config import ModelConfig  # noqa: E402
from luvc_common.engine.pipeline import Pipeline  # noqa: E402
from llm_service.ray_app import llm_app  # noqa: E402
from luvc_common.serving.ray import SERVICER_FUNCTIONS  # noqa: E402

PROMPT = "What color is the circle?"
DEMO = conftest.ASSETS / "demo.png"
ENCODER_TOKEN = "enc-secret"


@pytest.fixture(scope="module")
def encoder(tiny_qwen2vl, tmp_path_factory):
    service = Service(["encoder", "--model", tiny_qwen2vl, "--auth-token", ENCODER_TOKEN], tmp_path_factory.mktemp("logs") / "encoder.log").start()
    yield service
    service.stop()


def _generate_until_ready(target: str, timeout: float = 300.0, token: str | None = None, **kwargs):
    end = time.monotonic() + timeout
    with LUVCClient(target, ClientOptions(token=token)) as client:
        while True:
            try:
                return client.generate(PROMPT, [image_file(DEMO)], timeout=60, **kwargs)
            except grpc.RpcError as e:  # proxy up before the app, or a replica being replaced (slow to start on a busy box)
                if time.monotonic() > end:
                    raise
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED), e
                time.sleep(1)


def _ray_processes(temp_dir: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _ray_metrics(port: str, wanted: Callable[[dict], bool], timeout: float = 90.0) -> dict:
    """{(name, labels without Ray's own tags): value} from the local Ray's metrics export, once wanted(samples)
    (the agent exports what replicas recorded every few seconds)."""
    end = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            samples = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in ("service", "method", "code", "layer")))): s.value
                       for family in text_string_to_metric_families(reply.read().decode()) for s in family.samples
                       if s.name.startswith("ray_luvc_")}
        if wanted(samples) or time.monotonic() > end:
            return samples
        time.sleep(2)


def test_cli_ray_deploy_answers_like_in_process_and_shuts_down_clean(encoder, tiny_qwen2vl, tmp_path_factory, demo_image):
    """`luvc serve llm --ray` with the flags docker-compose uses: a token on the public port and
    another one sent to the encoder (which refuses requests without it), and the replicas' metrics
    exported by the local Ray at --metrics-port."""
    temp_dir = str(tmp_path_factory.mktemp("ray"))
    metrics_port = str(free_port())
    llm = Service(["llm", "--ray", "--model", tiny_qwen2vl, "--encoder", encoder.target, "--auth-token", "llm-secret",
                   "--encoder-token", ENCODER_TOKEN, "--max-new-tokens", "16", "--metrics-port", metrics_port],
                  tmp_path_factory.mktemp("l") / "llm.log", env={"RAY_TMPDIR": temp_dir, "RAY_ADDRESS": ""})  # "" = start a local instance
    llm.start(wait=False)
    try:
        local = Pipeline(ModelConfig(tiny_qwen2vl)).generate([demo_image], PROMPT, method_config("luvc"), 8)
        for method in ("luvc", "none"):
            remote = _generate_until_ready(llm.target, token="llm-secret", method=method, max_new_tokens=8, wire_dtype="FP32")
            if method == "luvc":
                assert list(remote.token_ids) == local.token_ids and list(remote.llm_per_layer) == local.visual_tokens["llm_per_layer"]
            assert remote.encoder_out > 0
        for token, prompt, max_new, expected in [(None, PROMPT, 4, grpc.StatusCode.UNAUTHENTICATED),
                                                 ("wrong", PROMPT, 4, grpc.StatusCode.UNAUTHENTICATED),
                                                 ("llm-secret", " ", 4, grpc.StatusCode.INVALID_ARGUMENT),
                                                 ("llm-secret", PROMPT, 17, grpc.StatusCode.INVALID_ARGUMENT)]:  # --max-new-tokens 16
            with LUVCClient(llm.target, ClientOptions(token=token)) as client:  # errors keep their status code through Ray's proxy
                with pytest.raises(grpc.RpcError) as info:
                    client.generate(prompt, [image_file(DEMO)], max_new_tokens=max_new, timeout=30)
                assert info.value.code() == expected, (token, prompt, info.value.details())
        assert _ray_processes(temp_dir), "expected Ray processes under RAY_TMPDIR while serving"
        ok = ("ray_luvc_requests_total", (("code", "OK"), ("method", "generate"), ("service", "llm")))
        invalid = ("ray_luvc_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "generate"), ("service", "llm")))
        samples = _ray_metrics(metrics_port, lambda s: s.get(ok, 0) >= 2 and s.get(invalid, 0) >= 2)
        assert samples.get(ok, 0) >= 2 and samples.get(invalid, 0) >= 2, sorted(samples)[:20]
        assert samples[("ray_luvc_generated_tokens_total", (("method", "luvc"),))] > 0
        assert samples[("ray_luvc_visual_tokens_total", (("layer", "0"), ("method", "luvc")))] > 0
        assert ("ray_luvc_queue_depth", (("service", "llm"),)) in samples  # a gauge the replica pushes from its engine
    finally:
        t0 = time.monotonic()
        code = llm.stop(signal.SIGTERM, timeout=60)
        elapsed = time.monotonic() - t0
    assert code == 0 and elapsed < 60
    deadline = time.monotonic() + 15
    while _ray_processes(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes(temp_dir) == []


def _live_replicas() -> dict:
    """Replica actors of the llm deployment that are still alive, by name."""
    live = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::llm#llm"):
            try:
                live[actor["name"]] = ray.get_actor(actor["name"], namespace=actor["namespace"])
            except ValueError:  # already gone
                pass
    return live


def _running_replicas() -> int:
    status = serve.status().applications["llm"].deployments["llm"]
    return status.replica_states.get("RUNNING", 0)


def test_autoscaling_and_replica_replacement(encoder, tiny_qwen2vl, tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        port = free_port()
        serve.start(http_options={"port": free_port()}, grpc_options={"port": port, "grpc_servicer_functions": SERVICER_FUNCTIONS})
        app = llm_app({"encoder": encoder.target, "encoder_token": ENCODER_TOKEN, "model": tiny_qwen2vl, "num_cpus": 0.25, "max_replicas": 3,
                       "target_ongoing_requests": 1, "upscale_delay_s": 1.0, "downscale_delay_s": 4.0})
        serve.run(app, name="llm", route_prefix="/llm")
        target = f"127.0.0.1:{port}"
        assert _generate_until_ready(target, max_new_tokens=4).encoder_out > 0
        assert _running_replicas() == 1

        timeline, stop = [], threading.Event()
        t0 = time.monotonic()

        def load(_):
            with LUVCClient(target) as client:
                while not stop.is_set():
                    client.generate("count to twenty", [], max_new_tokens=48, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(load, i) for i in range(6)]
            while time.monotonic() - t0 < 90 and max((n for _, n in timeline), default=1) < 2:
                timeline.append((round(time.monotonic() - t0, 1), _running_replicas()))
                time.sleep(1)
            stop.set()
            for f in futures:
                f.result()  # every load request succeeded
        peak = max(n for _, n in timeline)
        while time.monotonic() - t0 < 240 and _running_replicas() > 1:
            timeline.append((round(time.monotonic() - t0, 1), _running_replicas()))
            time.sleep(2)
        timeline.append((round(time.monotonic() - t0, 1), _running_replicas()))
        print("replicas over time (s, RUNNING):", timeline)
        assert peak > 1, timeline
        assert timeline[-1][1] == 1, timeline

        killed = _live_replicas()
        assert killed
        for handle in killed.values():
            ray.kill(handle, no_restart=True)
        assert _generate_until_ready(target, max_new_tokens=4).encoder_out > 0  # Serve started a new replica
        assert set(_live_replicas()) - set(killed)
    finally:
        serve.shutdown()
        ray.shutdown()
