"""The REAL OpenTelemetry collector for tests: ``rotel-agent`` run as a subprocess.

`RotelCollector` starts the Rust collector shipped in the PyPI package ``rotel``
(the binary is ``<site-packages>/rotel/rotel-agent``) with OTLP gRPC and OTLP
HTTP receivers on free loopback ports, exporting OTLP/gRPC (uncompressed) to an
endpoint the test owns, normally an `OtlpSink`. Batching, request timeouts and
retries are cut to milliseconds/seconds so data reaches the sink quickly and a
stopped sink never holds shutdown up for minutes.

`stop()` (or `kill()`, a crash) then `start()` brings the collector back on the SAME
ports, which is what a "collector down, then back" test needs. Nothing here talks to the
network beyond loopback, and no environment variable is required; ROTEL_*
variables of the calling process are dropped so they cannot change the setup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .otlp_sink import OtlpSink

__all__ = ["FAST_EXPORT_ENV", "OtlpSink", "RotelCollector", "find_rotel_agent"]

# For a server subprocess: push metrics every 0.3 s and spans every 0.1 s, so a test
# sees telemetry promptly instead of after the SDK's 60 s / 5 s defaults.
FAST_EXPORT_ENV = {"OTEL_METRIC_EXPORT_INTERVAL": "300", "OTEL_BSP_SCHEDULE_DELAY": "100"}


def find_rotel_agent() -> Path:
    """Path of the ``rotel-agent`` binary inside the installed ``rotel`` package.

    Raises FileNotFoundError when the package or its binary is missing.
    """
    import rotel

    path = Path(rotel.__file__).resolve().parent / "rotel-agent"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(f"rotel-agent not found at {path}; pip install rotel")
    return path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class RotelCollector:
    """``rotel-agent`` subprocess: OTLP in on loopback, OTLP/gRPC out to `export_endpoint`.

    `export_endpoint` is ``host:port`` of an OTLP/gRPC receiver (e.g.
    ``OtlpSink().start().endpoint``). Use as a context manager or call
    `start()` / `stop()`; both are idempotent. `start()` blocks until both
    receivers accept connections and raises RuntimeError (with the agent's log
    tail) when the agent exits or does not come up within `start_timeout`.
    """

    def __init__(
        self,
        export_endpoint: str,
        *,
        host: str = "127.0.0.1",
        batch_timeout_ms: int = 50,
        exporter_timeout_s: float = 2.0,
        retry_max_elapsed_s: float = 5.0,
        start_timeout: float = 15.0,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        if not export_endpoint or ":" not in export_endpoint:
            raise ValueError(f"export_endpoint must be host:port, got {export_endpoint!r}")
        self._export_endpoint = export_endpoint
        self._host = host
        self._batch_timeout_ms = int(batch_timeout_ms)
        self._exporter_timeout_s = exporter_timeout_s
        self._retry_max_elapsed_s = retry_max_elapsed_s
        self._start_timeout = start_timeout
        self._binary = Path(binary) if binary is not None else find_rotel_agent()
        self._grpc_port = 0
        self._http_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="rotel-"))
        self._log_path = self._workdir / "agent.log"
        self.last_start_seconds: float | None = None

    # endpoints -------------------------------------------------------------
    @property
    def otlp_grpc_endpoint(self) -> str:
        """``http://host:port`` of the OTLP gRPC receiver (use with insecure=True)."""
        return f"http://{self._host}:{self._require_port(self._grpc_port)}"

    @property
    def otlp_http_endpoint(self) -> str:
        """``http://host:port`` base of the OTLP HTTP receiver (append ``/v1/traces`` etc.)."""
        return f"http://{self._host}:{self._require_port(self._http_port)}"

    def otel_env(self, protocol: str = "grpc") -> dict[str, str]:
        """Standard OTEL_* variables pointing an SDK (e.g. a server subprocess) here.

        `protocol` is ``grpc`` or ``http/protobuf``.
        """
        if protocol == "grpc":
            endpoint = self.otlp_grpc_endpoint
        elif protocol == "http/protobuf":
            endpoint = self.otlp_http_endpoint
        else:
            raise ValueError(f"protocol must be 'grpc' or 'http/protobuf', got {protocol!r}")
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        }

    @property
    def running(self) -> bool:
        """True while the agent process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _require_port(self, port: int) -> int:
        if not port:
            raise RuntimeError("RotelCollector has not been started yet")
        return port

    # lifecycle -------------------------------------------------------------
    def start(self) -> RotelCollector:
        """Start the agent (same ports as before after a `stop`); returns self."""
        if self.running:
            return self
        began = time.monotonic()
        first_start = not self._grpc_port
        # Free ports are picked by binding port 0 then releasing it, so another
        # process can grab one in between; on a first start that is retried
        # with fresh ports, on a restart the ports must stay the same.
        attempts = 3 if first_start else 1
        for attempt in range(attempts):
            if first_start:
                self._grpc_port = _free_port(self._host)
                self._http_port = _free_port(self._host)
            try:
                self._spawn_and_wait()
                break
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
        self.last_start_seconds = time.monotonic() - began
        return self

    def _command(self) -> list[str]:
        return [
            str(self._binary), "start",
            "--otlp-grpc-endpoint", f"{self._host}:{self._grpc_port}",
            "--otlp-http-endpoint", f"{self._host}:{self._http_port}",
            "--pid-file", str(self._workdir / "agent.pid"),
            "--log-file", str(self._workdir / "agent.daemon.log"),
            "--batch-timeout", f"{self._batch_timeout_ms}ms",
            "--exporter", "otlp",
            "--otlp-exporter-endpoint", f"http://{self._export_endpoint}",
            "--otlp-exporter-protocol", "grpc",
            "--otlp-exporter-compression", "none",
            "--otlp-exporter-request-timeout", f"{int(self._exporter_timeout_s * 1000)}ms",
            "--otlp-exporter-retry-initial-backoff", "100ms",
            "--otlp-exporter-retry-max-backoff", "1s",
            "--otlp-exporter-retry-max-elapsed-time", f"{int(self._retry_max_elapsed_s * 1000)}ms",
        ]

    def _spawn_and_wait(self) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("ROTEL_")}
        env["NO_COLOR"] = "1"
        log = open(self._log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
        try:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=self._workdir,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"rotel-agent exited during start:\n{self.log_tail()}")
            if _port_open(self._host, self._grpc_port) and _port_open(self._host, self._http_port):
                return
            time.sleep(0.02)
        self._terminate()
        raise RuntimeError(f"rotel-agent not listening after {self._start_timeout}s:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the agent (it flushes what it holds), SIGKILL after `timeout`. Idempotent."""
        self._terminate(timeout)

    def kill(self) -> None:
        """SIGKILL the agent: a crash, nothing flushed. `start()` brings it back. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _terminate(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the agent and delete its working directory (logs included)."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> RotelCollector:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """Last `lines` lines the agent wrote (for failure messages)."""
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
