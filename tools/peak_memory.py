"""Peak resident memory of both services under the largest requests the default limits allow.

Starts the encoder and the LLM service on loopback, samples each process's RSS every 50 ms while it
sends, one at a time: a text prompt of about max_prompt_tokens tokens, a video at max_vit_patches, and
8 images at the largest size the image processor keeps. Prints the peak per service and request.

    .venv/bin/python tools/peak_memory.py [--model DIR]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
from PIL import Image

from luvc_common.client import LUVCClient
from luvc_common.config import DEFAULT_MODEL, Limits
from luvc_common.serving.launch import Service
from luvc_common.proto import luvc_pb2


def _png(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((side, side), 64 + seed).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


class Peak:
    """Highest RSS of a process while the block runs, sampled on a thread."""

    def __init__(self, pid: int):
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    args = p.parse_args()
    limits, logs = Limits(), Path(tempfile.mkdtemp(prefix="luvc-mem-"))
    encoder = Service(["encoder", "--model", args.model], logs / "encoder.log").start()
    llm = Service(["llm", "--model", args.model, "--encoder", encoder.target], logs / "llm.log").start()
    frames = 2 * (limits.max_vit_patches // (48 * 48))  # 672x672 frames: 48x48 patches per temporal pair
    patches = frames // 2 * 48 * 48
    requests = {
        f"text prompt of ~{limits.max_prompt_tokens - 64} tokens": ("?" * (limits.max_prompt_tokens - 64), []),
        f"video of {frames} frames at 672x672 ({patches} patches; max_vit_patches={limits.max_vit_patches})":
            ("What color is it?", [luvc_pb2.Media(video=luvc_pb2.Video(frames=[_png(672, i) for i in range(frames)]))]),
        f"{limits.max_media} images of 672x672": ("What color is it?", [luvc_pb2.Media(image=_png(672, i)) for i in range(limits.max_media)]),
    }
    try:
        with LUVCClient(llm.target) as client:
            for name, (prompt, media) in requests.items():
                with Peak(encoder.proc.pid) as enc, Peak(llm.proc.pid) as lm:
                    t0 = time.perf_counter()
                    try:
                        stats = client.generate(prompt, media, method="none", max_new_tokens=4, timeout=1800)
                        outcome = f"OK, {len(stats.prompt_ids)} prompt tokens"
                    except grpc.RpcError as e:  # report what the service answered
                        outcome = f"{e.code().name}: {e.details()}"
                    seconds = time.perf_counter() - t0
                print(f"{name}: {outcome}; {seconds:.1f} s; peak RSS encoder {enc.peak / 2**20:.0f} MiB, LLM {lm.peak / 2**20:.0f} MiB", flush=True)
    finally:
        llm.stop()
        encoder.stop()


if __name__ == "__main__":
    main()
