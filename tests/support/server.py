"""Run the real ``paddle-meter serve`` as a subprocess on free loopback ports, for tests.

One server per test module (loading PP-OCR takes seconds): ``ServerProcess`` writes a
config file into a temp dir, starts the console script (on free ports, or on the given ones
to replace a killed server where its clients connect), waits until both ports answer and
the models are ready, and on ``stop()`` sends SIGTERM and fails unless the server exits 0
in time (a graceful stop that crashes or hangs is a bug, not noise).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

__all__ = ["ServerProcess", "free_port"]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        workers: int = 1,
        grpc_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        # Given ports: a replacement for a killed server, found where clients already connect.
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.config = dict(config or {})
        self.config.setdefault("server", {})
        self.config["server"] = {
            "data_dir": str(self.workdir / "data"),
            **self.config["server"],
            "grpc_port": self.grpc_port,
            "http_port": self.http_port,
            "workers": workers,
        }
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "server.log"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 180.0) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")
        exe = Path(sys.executable).with_name("paddle-meter")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--config", str(config_path)],
            cwd=self.workdir,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.logs()[-4000:]}"
                )
            if self.is_ready():
                return self
            time.sleep(0.2)
        self.stop(check=False)
        raise TimeoutError(f"server not ready in {timeout_s}s:\n{self.logs()[-4000:]}")

    def is_ready(self) -> bool:
        """Whether readiness answers 200 (subclasses probe over TLS, say)."""
        try:
            return httpx.get(f"{self.http_url}/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def logs(self) -> str:
        return (
            self.log_path.read_text(encoding="utf-8", errors="replace")
            if self.log_path.exists()
            else ""
        )

    def stop(
        self, sig: int = signal.SIGTERM, timeout_s: float = 60.0, *, check: bool | None = None
    ) -> int | None:
        """Send ``sig`` unless the server already exited, wait, and return its exit code.

        ``check`` (default: on for SIGTERM, the graceful stop; off for other signals such as
        SIGKILL, whose exit code is the point) raises AssertionError with the log tail unless
        the server exited 0 within ``timeout_s``; one still running then is killed first.
        Idempotent; returns None if it was never started.
        """
        if self.proc is None:
            return None
        if check is None:
            check = sig == signal.SIGTERM
        hung = False
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                hung = True
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        code = self.proc.returncode
        if check and (hung or code != 0):
            why = f"did not exit within {timeout_s}s of signal {sig}" if hung else f"exited {code}"
            raise AssertionError(f"server {why}:\n{self.logs()[-4000:]}")
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # A failing test's own error is the one to see: do not bury it under the exit check.
        self.stop(check=exc_type is None)
