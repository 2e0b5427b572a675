"""Start `luvc serve ...` processes on loopback ports and wait for their health: for `luvc demo` and tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from luvc_common.client import check_health


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Service:
    """One `luvc serve ...` process, logging to a file."""

    def __init__(self, args: list[str], log: Path, port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.args, self.log_path, self.env = args, log, env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Service":
        self.log_file = open(self.log_path, "ab")
        env = {**os.environ, "LUVC_LOG_LEVEL": "INFO", **self.env}
        cmd = [sys.executable, "-m", "luvc_common.cli", "serve", *self.args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_status("SERVING")
        return self

    def wait_status(self, status: str, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if check_health(self.target, timeout=2.0) == status:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.target} not {status} after {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:  # never started
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode
