"""Assemble metering for a serving process from config: telemetry, ledger, prices, core.

Returns the pieces the transports need (gRPC interceptors, an ASGI wrapper, extra HTTP
routes: ``/metrics`` and ``/v1/usage``) and one ``shutdown`` that flushes them in order:
the core first (no new records), then telemetry, then the ledger (everything durable).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from fastapi import APIRouter
from fastapi.responses import Response

from billing.pricing import PriceBook
from billing.usage_api import make_usage_router
from exporters.ledger import open_ledger
from exporters.ledger.reader import LedgerReader
from exporters.otel import Telemetry, TelemetryConfig, setup_telemetry
from interceptors import MeteringCore, MeteringMiddleware, MeteringServerInterceptor
from serving.config import ledger_options, ledger_url, pricing_path

__all__ = ["Metering", "build_metering"]


@dataclasses.dataclass
class Metering:
    core: MeteringCore
    telemetry: Telemetry | None
    ledger: Any | None
    grpc_interceptors: list[grpc.aio.ServerInterceptor]
    wrap_asgi: Callable[[Any], Any]
    http_routers: list[APIRouter]

    def shutdown(self) -> None:
        """Flush and close everything; idempotent (each part is)."""
        self.core.close()
        if self.telemetry is not None:
            self.telemetry.shutdown()
        if self.ledger is not None:
            self.ledger.shutdown()


def _metrics_router(telemetry: Telemetry) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = await asyncio.to_thread(telemetry.render_metrics)
        return Response(body, media_type=content_type)

    return router


def build_metering(config: Mapping[str, Any], data_dir: Path) -> Metering:
    """Build from config; blocks while the ledger connects and migrates."""
    settings = config["metering"]
    if not settings["enabled"]:
        core = MeteringCore.from_config(settings, None)
        return Metering(core, None, None, [], lambda app: app, [])
    telemetry = setup_telemetry(TelemetryConfig.from_mapping(config["telemetry"]))
    url = ledger_url(config)
    ledger = open_ledger(url, **ledger_options(config, data_dir))
    prices = PriceBook.load(pricing_path(config))
    core = MeteringCore.from_config(settings, telemetry, ledger=ledger, pricebook=prices)
    routers = []
    if telemetry.config.prometheus:
        routers.append(_metrics_router(telemetry))
    if not url.startswith("jsonl://"):
        routers.append(make_usage_router(functools.cache(lambda: LedgerReader(url))))
    return Metering(
        core,
        telemetry,
        ledger,
        [MeteringServerInterceptor(core)],
        lambda app: MeteringMiddleware(app, core),
        routers,
    )
