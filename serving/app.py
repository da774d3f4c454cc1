"""One serving process: models, gRPC server, HTTP server, metering, graceful shutdown.

``PaddleMeterServer`` is what ``paddle-meter serve`` runs in each worker process and what
tests and benchmarks start in-process. Startup order: load models (blocking, in a thread),
set up metering, bind gRPC then HTTP. Shutdown (SIGTERM/SIGINT or :meth:`stop`): report
NOT_SERVING, stop accepting, let in-flight requests finish within the grace period, then
drain the models (batches still queued run, so their stage spans reach a live tracer) and
close them with the inference pool, and last flush metering and the ledger, so every
record of a finished request is written before the process exits.

Readiness (``/v2/health/ready``, gRPC ServerReady and ``grpc.health.v1``) is one answer,
:meth:`PaddleMeterServer.ready`: every model loaded AND the ledger able to accept records
(``ReportsHealth.can_accept``). While the ledger can neither commit nor spool, or its
writer queue is full, calls would be refused, so the server says it is not ready and a
load balancer sends traffic elsewhere. grpc.health is refreshed on each Check and every
second for Watch streams.

Back-pressure, per transport: gRPC calls pass serving/grpc_guard.py (after metering,
``server.max_concurrent_rpcs``, grpc's own limit a little higher), HTTP requests pass
serving/http_app.py's ConcurrencyLimit (``server.max_concurrent_http``), inferences the
model host's bounded pool (``server.max_queued_inferences``).

Before anything loads, :func:`serving.tls.check_exposure` refuses ``auth.mode: off`` on a
non-loopback address and :func:`serving.tls.load_tls` validates ``server.tls``; with a
certificate both ports speak TLS only (gRPC ``add_secure_port``, uvicorn's SSL context on
the pre-bound socket), and with ``client_ca_file`` both require a client certificate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Mapping
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2_grpc

from exporters.ledger.base import ReportsHealth
from serving import oip_grpc, pipeline_grpc
from serving.data_dir import prepare_data_dir
from serving.grpc_guard import GrpcGuard, grpc_backstop
from serving.http_app import BodyLimit, ConcurrencyLimit, build_http_app
from serving.metering_setup import Metering, build_metering
from serving.model_host import ModelHost
from serving.proto import pipeline_service_pb2_grpc
from serving.tls import ServerTls, check_exposure, load_tls

__all__ = ["PaddleMeterServer", "serve_forever"]

log = logging.getLogger(__name__)


def _listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto
    # says TCP, and without it every keep-alive answer after the first waits ~40 ms for
    # the client's delayed ACK (Nagle: headers and body are two writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


_HEALTH_SERVICES = ("", oip_grpc.SERVICE_NAME, pipeline_grpc.SERVICE_NAME)
_HEALTH_REFRESH_S = 1.0  # how often Watch streams hear a readiness change


class _ReadinessHealth(health.aio.HealthServicer):
    """grpc.health.v1 whose answer follows the server's readiness (models and ledger)."""

    def __init__(self, ready: Any) -> None:
        super().__init__()
        self._ready = ready
        self._serving: bool | None = None
        self.shutting_down = False

    async def refresh(self) -> None:
        serving = self._ready() and not self.shutting_down
        if serving != self._serving:
            self._serving = serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in _HEALTH_SERVICES:
                await self.set(name, status)

    async def Check(self, request, context):  # noqa: N802 (grpc method name)
        if not self.shutting_down:
            await self.refresh()
        return await super().Check(request, context)


class PaddleMeterServer:
    """Both transports over one ModelHost. Ports of 0 pick free ones (see ``*_port`` after start)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        server = config["server"]
        self._host_addr: str = server["host"]
        self.grpc_port: int = int(server["grpc_port"])
        self.http_port: int = int(server["http_port"])
        self._reuse_port = int(server.get("workers", 1)) > 1
        self._grace_s = float(server["shutdown_grace_s"])
        self._max_bytes = int(server["max_message_bytes"])
        self._max_rpcs = int(server["max_concurrent_rpcs"])
        self._max_http = int(server["max_concurrent_http"])
        self._max_json_depth = int(server["max_json_depth"])
        self._ocr_url_hosts = _url_hosts(server.get("ocr_url_hosts"))
        self.models = ModelHost(config["models"], server)
        self.metering: Metering | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._health = _ReadinessHealth(self.ready)
        self._health_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._tls: ServerTls | None = None

    def ready(self) -> bool:
        """Every model ready and the ledger (if any) able to accept a record now."""
        ledger = self.metering.ledger if self.metering is not None else None
        if isinstance(ledger, ReportsHealth) and not ledger.can_accept():
            return False
        return self.models.all_ready()

    async def _refresh_health(self) -> None:
        while True:
            await self._health.refresh()
            await asyncio.sleep(_HEALTH_REFRESH_S)

    async def start(self) -> None:
        # Before the models load: a refused exposure or a bad TLS file fails in an instant.
        check_exposure(self.config)
        self._tls = load_tls(self.config)
        data_dir = prepare_data_dir(self.config["server"]["data_dir"])
        await asyncio.to_thread(self.models.load, data_dir / "compiled")
        self.metering = build_metering(self.config, data_dir)
        await self._start_grpc()
        await self._start_http()
        await self._health.refresh()
        self._health_task = asyncio.create_task(self._refresh_health())
        log.info(
            "serving",
            extra={
                "grpc": f"{self._host_addr}:{self.grpc_port}",
                "http": f"{self._host_addr}:{self.http_port}",
                "models": ",".join(self.models.names()),
                "tls": self._tls.describe() if self._tls is not None else "off",
                "pid": os.getpid(),
            },
        )

    async def _start_grpc(self) -> None:
        assert self.metering is not None
        options = [
            ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            ("grpc.max_receive_message_length", self._max_bytes),
            ("grpc.max_send_message_length", self._max_bytes),
        ]
        # The guard after metering: metering sees (and records) what the guard answers.
        interceptors = [*self.metering.grpc_interceptors, GrpcGuard(self._max_rpcs)]
        server = grpc.aio.server(
            interceptors=interceptors,
            options=options,
            maximum_concurrent_rpcs=grpc_backstop(self._max_rpcs),
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            oip_grpc.OipGrpcService(self.models, self.ready), server
        )
        pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(
            pipeline_grpc.PipelineGrpcService(self.models), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                oip_grpc.SERVICE_NAME,
                pipeline_grpc.SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{self._host_addr}:{self.grpc_port}"
        try:
            if self._tls is not None:
                self.grpc_port = server.add_secure_port(address, self._tls.grpc_credentials())
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen for gRPC on {address}: port in use?") from exc
        await server.start()
        self._grpc = server
        if self._tls is not None:
            log.info(
                "gRPC speaks TLS only",
                extra={
                    "cert_file": str(self._tls.cert_file),
                    "client_certificates": "required" if self._tls.mutual else "not asked",
                },
            )

    async def _start_http(self) -> None:
        assert self.metering is not None
        app = build_http_app(
            self.models,
            extra_routers=self.metering.http_routers,
            ready=self.ready,
            max_json_depth=self._max_json_depth,
            ocr_url_hosts=self._ocr_url_hosts,
            max_fetch_bytes=self._max_bytes,
        )
        # Inside metering, so an oversized or refused request still gets its (error) span.
        asgi = self.metering.wrap_asgi(
            ConcurrencyLimit(BodyLimit(app, self._max_bytes), self._max_http)
        )
        sock = _listen_socket(self._host_addr, self.http_port, self._reuse_port)
        self.http_port = sock.getsockname()[1]
        # uvicorn wraps the sockets given to serve() in its SSL context too (loop.create_server
        # with ssl=config.ssl), so the pre-bound SO_REUSEPORT socket speaks TLS only.
        tls_options = self._tls.uvicorn_options() if self._tls is not None else {}
        config = uvicorn.Config(
            asgi,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(self._grace_s),
            server_header=False,
            **tls_options,
        )
        self._http = uvicorn.Server(config)
        # uvicorn installs its own signal handlers inside serve(); ours govern both servers.
        self._http.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.01)
        if self._tls is not None:
            log.info(
                "HTTP speaks TLS only",
                extra={
                    "cert_file": str(self._tls.cert_file),
                    "client_certificates": "required" if self._tls.mutual else "not asked",
                },
            )

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests, flush; idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("shutting down", extra={"grace_s": self._grace_s})
        if self._health_task is not None:
            self._health_task.cancel()
        self._health.shutting_down = True
        await self._health.enter_graceful_shutdown()
        waits = []
        if self._http is not None:
            self._http.should_exit = True
            waits.append(self._http_task)
        if self._grpc is not None:
            waits.append(self._grpc.stop(self._grace_s))
        await asyncio.gather(*[w for w in waits if w is not None], return_exceptions=True)
        try:
            # Before metering: every request's record is final once the transports stopped
            # (finished or cancelled), but a draining batch still emits its stage spans.
            await self.models.aclose(timeout_s=self._grace_s)
        finally:
            if self.metering is not None:
                await asyncio.to_thread(self.metering.shutdown)
            self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def _run(server: PaddleMeterServer) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    await server.stop()


def serve_forever(
    config: Mapping[str, Any], server_class: type[PaddleMeterServer] = PaddleMeterServer
) -> None:
    """Run one serving process until SIGTERM/SIGINT; returns after a clean shutdown.

    ``server_class`` lets a benchmark run a variant (bench/serve_stock_otel.py)."""
    asyncio.run(_run(server_class(config)))


def _url_hosts(value: object) -> frozenset[str]:
    """``server.ocr_url_hosts``: host names /ocr may fetch a ``file`` URL from."""
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(h, str) and h for h in value):
        raise ValueError("server.ocr_url_hosts must be a list of host names, e.g. [docs.example]")
    return frozenset(h.lower() for h in value)
