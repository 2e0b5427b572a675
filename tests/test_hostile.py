"""Hostile requests against both services as real processes on loopback.

Every case must end in a clear status code whose message names the problem, within the call's
deadline (a hang fails as DEADLINE_EXCEEDED), with health still answering, bounded memory, and a
good request answered right after.
"""
import io
import math
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

import conftest
from luvc_common.client import ClientOptions, LUVCClient, check_health, image_file
from luvc_common.serving.launch import Service
from luvc_common.proto import luvc_pb2
from luvc_common.serving.wire import to_wire

PROMPT = "What color is the circle?"
DEMO = conftest.ASSETS / "demo.png"
DEADLINE_S = 30.0  # generous: a case that hangs fails on it; no case is timed against a threshold
INVALID, EXHAUSTED, UNAUTH = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "white").save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h but whose pixel data is one empty chunk: decoding it would fail
    or take huge memory, so only a header check can answer it cleanly."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, "TIFF")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tiny_qwen2vl, tmp_path_factory):
    logs = tmp_path_factory.mktemp("hostile")
    encoder = Service(["encoder", "--model", tiny_qwen2vl], logs / "encoder.log").start()
    llm = Service(["llm", "--model", tiny_qwen2vl, "--encoder", encoder.target], logs / "llm.log").start()
    yield encoder, llm
    llm.stop()
    encoder.stop()


@pytest.fixture(scope="module")
def client(stack):
    with LUVCClient(stack[1].target, ClientOptions(max_message_bytes=128 << 20)) as c:
        yield c


def _visual(encoder_target: str, **change) -> luvc_pb2.EncodeResponse:
    with LUVCClient(encoder_target) as c:
        visual = c.encode([image_file(DEMO)], method="none", wire_dtype="FP32")
    for key, value in change.items():
        if key in ("grid", "source_grid"):
            getattr(visual.media[0], key).CopyFrom(luvc_pb2.Grid(t=value[0], h=value[1], w=value[2]))
        elif key == "tokens":
            visual.tokens.CopyFrom(value)
        else:
            setattr(visual, key, value)
    return visual


def _frames(n: int, side: int) -> luvc_pb2.Media:
    frame = _png(side, side)
    return luvc_pb2.Media(video=luvc_pb2.Video(frames=[frame] * n))


CASES = {
    # prompt
    "prompt over max_prompt_chars": (lambda c, e: c.generate("x " * 70000, [image_file(DEMO)]), INVALID, "max_prompt_chars"),
    "3,000 media markers": (lambda c, e: c.generate("<image>" * 3000 + " what?", [image_file(DEMO)]), INVALID, "places media"),
    "prompt over max_prompt_tokens": (lambda c, e: c.generate("?" * 40000, []), INVALID, "max_prompt_tokens"),
    # method
    "20 KB method": (lambda c, e: c.generate(PROMPT, [image_file(DEMO)], method="tome:" + "k" * 20000), INVALID, "method"),
    "repeated method option": (lambda c, e: c.generate(PROMPT, [image_file(DEMO)], method="tome:keep=0.5,keep=0.25"), INVALID, "repeated"),
    "65-bit random seed": (lambda c, e: c.generate(PROMPT, [image_file(DEMO)], method=f"random:seed={2**65}"), INVALID, "seed"),
    "non-numeric budget": (lambda c, e: c.generate(PROMPT, [image_file(DEMO)], method="fastv:keep=lots"), INVALID, "not a number"),
    "17 OIM merge steps": (lambda c, e: c.generate(PROMPT, [image_file(DEMO)], method="luvc:merges=" + "/".join(["0"] * 17)), INVALID, "1 to 16 steps"),
    "OIM knobs with OIM off": (lambda c, e: c.generate(PROMPT, [image_file(DEMO)], method="luvc:merges=none,axis=h"), INVALID, "turns oim off"),
    # media
    "aspect ratio 100000:1": (lambda c, e: c.generate(PROMPT, [luvc_pb2.Media(image=_png(100000, 1))]), INVALID, "aspect ratio"),
    "truncated PNG (header intact)": (lambda c, e: c.generate(PROMPT, [luvc_pb2.Media(image=_png(300, 300)[:-30])]), INVALID, "unreadable image"),
    "TIFF decoder not reachable": (lambda c, e: c.generate(PROMPT, [luvc_pb2.Media(image=_tiff())]), INVALID, "unreadable image"),
    "header claims 65535 x 65535": (lambda c, e: c.generate(PROMPT, [luvc_pb2.Media(image=_png_header_only(65535, 65535))]), INVALID, "pixels"),
    "frames over max_request_pixels": (lambda c, e: c.generate(PROMPT, [_frames(40, 4000)] * 2), INVALID, "max_request_pixels"),
    "frames over max_vit_patches": (lambda c, e: c.generate(PROMPT, [_frames(64, 1400)]), INVALID, "max_vit_patches"),
    "video without frames": (lambda c, e: c.generate(PROMPT, [luvc_pb2.Media(video=luvc_pb2.Video())]), INVALID, "without frames"),
    "media item with nothing set": (lambda c, e: c.generate(PROMPT, [luvc_pb2.Media()]), INVALID, "neither image nor video"),
    # precomputed visual tokens
    "huge grid, few bytes": (lambda c, e: c.generate(PROMPT, visual=_visual(e, grid=(1, 40000, 40000), source_grid=(1, 40000, 40000))), INVALID, "max_prompt_tokens"),
    "negative-looking grid": (lambda c, e: c.generate(PROMPT, visual=_visual(e, grid=(0, 2, 2))), INVALID, "grid"),
    "source grid below grid": (lambda c, e: c.generate(PROMPT, visual=_visual(e, source_grid=(1, 2, 2))), INVALID, "source_grid"),
    "vit_patches that lie": (lambda c, e: c.generate(PROMPT, visual=_visual(e, vit_patches=10**9)), INVALID, "vit_patches"),
    "NaN encode_ms": (lambda c, e: c.generate(PROMPT, visual=_visual(e, encode_ms=math.nan)), INVALID, "encode_ms"),
    "infinite tokens": (lambda c, e: c.generate(PROMPT, visual=_visual(e, tokens=to_wire(torch.full((1, 1), math.inf), "FP32"))), INVALID, "shape"),
    # sizes
    "message over max_message_mb": (lambda c, e: c.generate(PROMPT, [luvc_pb2.Media(image=b"\0" * (65 << 20))]), EXHAUSTED, ""),
}


def _fails_cleanly(call, code, words):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    assert words in details and len(details) <= 1100
    return details


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_request_gets_a_clear_error_and_service_keeps_serving(stack, client, case):
    encoder, llm = stack
    call, code, words = CASES[case]
    _fails_cleanly(lambda: call(_Deadline(client), encoder.target), code, words)
    assert check_health(llm.target) == "SERVING" and check_health(encoder.target) == "SERVING"
    assert client.generate(PROMPT, [image_file(DEMO)], max_new_tokens=2, timeout=DEADLINE_S).encoder_out > 0


class _Deadline:
    """The client with every call bounded by DEADLINE_S."""

    def __init__(self, client: LUVCClient):
        self.client = client

    def generate(self, *args, **kwargs):
        return self.client.generate(*args, timeout=DEADLINE_S, **kwargs)


def test_corrupt_body_unknown_method_and_wild_request_id(stack, client):
    encoder, llm = stack
    with grpc.insecure_channel(encoder.target) as channel:
        raw = lambda method: channel.unary_unary(method, lambda b: b, lambda b: b)  # noqa: E731
        _fails_cleanly(lambda: raw("/luvc.v1.Encoder/Encode")(b"\xff\xff\xff not protobuf", timeout=DEADLINE_S), INVALID, "not a valid message")
        details = _fails_cleanly(lambda: raw("/luvc.v1.Encoder/" + "x" * 6000)(b"", timeout=DEADLINE_S), grpc.StatusCode.UNIMPLEMENTED, "unknown method")
        assert "characters cut" in details
    wild = "id " + "z" * 5000
    stats = client.generate(PROMPT, [image_file(DEMO)], max_new_tokens=2, timeout=DEADLINE_S, request_id=wild)
    assert 0 < len(stats.request_id) <= 64 and " " not in stats.request_id
    assert "z" * 100 not in encoder.log() + llm.log()
    assert max(map(len, (encoder.log() + llm.log()).splitlines())) < 4000


def test_memory_stays_bounded(stack):
    for service in stack:
        rss = psutil.Process(service.proc.pid).memory_info().rss
        assert rss < 3 << 30, f"{service.target}: {rss >> 20} MiB after the hostile cases"


def test_cancel_stops_the_work_and_leaves_a_log_line(stack, client):
    """A cancel that arrives during a long prefill (a 16k-token prompt) ends the request at the first
    decode step: it leaves an `abandoned` line and never a `generated` one, though 1,000 tokens were asked."""
    llm = stack[1]
    stream = client.stream("?" * 16000, [], max_new_tokens=1000, timeout=120, request_id="cancel-me")
    codes = []

    def consume():
        try:
            list(stream)
        except grpc.RpcError as e:
            codes.append(e.code())

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    time.sleep(1.0)  # the prompt has arrived; its prefill takes several seconds more
    stream.cancel()
    consumer.join(DEADLINE_S)
    assert codes == [grpc.StatusCode.CANCELLED]
    assert client.generate(PROMPT, [image_file(DEMO)], max_new_tokens=2, timeout=120).encoder_out > 0
    mine = [line for line in llm.log().splitlines() if '"cancel-me"' in line]
    assert any('"request abandoned"' in line and '"CANCELLED"' in line for line in mine), mine
    assert not any('"generated"' in line for line in mine)  # it stopped instead of finishing


def test_encoder_stops_at_the_deadline_and_frees_its_slot(stack):
    encoder = stack[0]
    with LUVCClient(encoder.target) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.encode([_frames(64, 448)], timeout=0.5, request_id="too-slow")
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.encode([image_file(DEMO)], timeout=DEADLINE_S).media[0].num_tokens > 0  # after the abandoned work stopped
    mine = [line for line in encoder.log().splitlines() if '"too-slow"' in line]
    assert any('"request abandoned"' in line and '"DEADLINE_EXCEEDED"' in line for line in mine), mine
    assert not any('"encoded"' in line for line in mine)


def test_concurrent_requests_of_every_method_return_what_they_return_alone(client):
    methods = ["none", "luvc", "fastv:keep=0.5", "dart:keep=0.5", "tome:keep=0.5", "random:keep=0.5", "visionzip:keep=0.5", "pool"]
    jobs = [(m, p) for m in methods for p in (PROMPT, "What shape is the red object?")]
    run = lambda job: list(client.generate(job[1], [image_file(DEMO)], method=job[0], max_new_tokens=6, timeout=120).token_ids)  # noqa: E731
    alone = [run(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs * 2))
    assert together == alone * 2


def test_auth_is_checked_before_the_body_and_covers_reflection(tiny_qwen2vl, tmp_path):
    encoder = Service(["encoder", "--model", tiny_qwen2vl, "--auth-token", "enc-secret"], tmp_path / "e.log").start()
    misconfigured = Service(["llm", "--model", tiny_qwen2vl, "--encoder", encoder.target, "--auth-token", "llm-secret",
                             "--encoder-token", "wrong"], tmp_path / "l.log").start()
    try:
        big = [luvc_pb2.Media(image=b"\0" * (60 << 20))]
        with LUVCClient(encoder.target, ClientOptions(max_message_bytes=128 << 20)) as anonymous:
            _fails_cleanly(lambda: anonymous.encode(big, timeout=DEADLINE_S), UNAUTH, "bearer token")
        with grpc.insecure_channel(encoder.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            _fails_cleanly(lambda: list(stub.ServerReflectionInfo(iter([request]), timeout=DEADLINE_S)), UNAUTH, "bearer token")
            authed = list(stub.ServerReflectionInfo(iter([request]), timeout=DEADLINE_S, metadata=[("authorization", "Bearer enc-secret")]))
            assert authed[0].list_services_response.service
        assert check_health(encoder.target) == "SERVING"  # health needs no token
        with LUVCClient(misconfigured.target, ClientOptions(token="llm-secret")) as c:
            details = _fails_cleanly(lambda: c.generate(PROMPT, [image_file(DEMO)], timeout=DEADLINE_S), grpc.StatusCode.INTERNAL, "misconfigured")
            assert "encoder" in details
            assert c.generate("say something", [], max_new_tokens=2, timeout=DEADLINE_S).token_ids is not None
    finally:
        misconfigured.stop()
        encoder.stop()
