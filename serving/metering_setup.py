"""Assemble metering for a serving process from config: telemetry, ledger, prices, core.

Returns the pieces the transports need (gRPC interceptors, an ASGI wrapper, extra HTTP
routes: ``/metrics``, ``/v1/usage``, ``/v1/budgets``, ``/dashboard`` and ``/v1/keys``) and one ``shutdown``
that flushes them in order: the core first (no new records), the budget guard, then telemetry, then the ledger (everything
durable), then the key cache (its last-used times). The authenticator (auth/) is built
first: with ``auth.mode: required`` a server that cannot read its keys does not start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from auth.api import make_keys_router
from auth.authenticator import Authenticator
from auth.roles import Permission
from billing.anomalies import EVENT_ANOMALY, Anomaly, AnomalyDetector, detector_from_config
from billing.budget_api import make_budgets_router
from billing.budget_guard import BudgetGuard
from billing.dashboard import make_dashboard_router
from billing.pricing import PriceBook
from billing.usage_api import make_usage_router
from exporters.ledger import open_ledger
from exporters.ledger.reader import LedgerReader
from exporters.otel import Telemetry, TelemetryConfig, setup_telemetry
from interceptors import MeteringCore, MeteringMiddleware, MeteringServerInterceptor
from serving.config import WORKER_INDEX_ENV, ledger_options, ledger_url, pricing_path
from serving.errors import ServingError, http_headers, http_status

__all__ = ["Metering", "build_metering"]


@dataclasses.dataclass
class Metering:
    core: MeteringCore
    telemetry: Telemetry | None
    ledger: Any | None
    grpc_interceptors: list[grpc.aio.ServerInterceptor]
    wrap_asgi: Callable[[Any], Any]
    http_routers: list[APIRouter]
    authenticator: Authenticator | None = None
    guard: BudgetGuard | None = None
    detector: AnomalyDetector | None = None

    def shutdown(self) -> None:
        """Flush and close everything; idempotent (each part is)."""
        self.core.close()
        if self.detector is not None:
            self.detector.close()
            self.detector = None
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        if self.telemetry is not None:
            self.telemetry.shutdown()
        if self.ledger is not None:
            self.ledger.shutdown()
        if self.authenticator is not None:
            self.authenticator.close()


def _metrics_router(telemetry: Telemetry, authenticator: Authenticator) -> APIRouter:
    router = APIRouter()
    guarded = authenticator.metrics_require_key

    @router.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if guarded:  # auth.metrics_require_key: an auditor or admin key (never metered)
            try:
                authenticator.admit(
                    Permission.READ_USAGE,
                    {k.lower(): v for k, v in request.headers.items()},
                    request.client.host if request.client else None,
                )
            except ServingError as refusal:
                return JSONResponse(
                    {"error": refusal.message},
                    status_code=http_status(refusal.kind),
                    headers=http_headers(refusal),
                )
        body, content_type = await asyncio.to_thread(telemetry.render_metrics)
        return Response(body, media_type=content_type)

    return router


def _anomaly_span(telemetry: Telemetry, anomaly: Anomaly) -> None:
    """An anomaly as a short span of its own with the event (for trace-based alerting)."""
    with telemetry.tracer.start_as_current_span(EVENT_ANOMALY) as span:
        span.add_event(EVENT_ANOMALY, {"rule": anomaly.rule, "paddle_meter.tenant": anomaly.tenant,
                                       "value": anomaly.value, "threshold": anomaly.threshold,
                                       "summary": anomaly.summary})


def build_metering(config: Mapping[str, Any], data_dir: Path) -> Metering:
    """Build from config; blocks while the ledger connects and migrates."""
    settings = config["metering"]
    if not settings["enabled"]:
        core = MeteringCore.from_config(settings, None)
        return Metering(core, None, None, [], lambda app: app, [])
    authenticator = Authenticator.from_config(config, data_dir)
    try:
        telemetry = setup_telemetry(TelemetryConfig.from_mapping(config["telemetry"]))
        telemetry.merge_workers(int(os.environ.get(WORKER_INDEX_ENV, "0")),
                                int(config["server"]["workers"]), data_dir / "metrics")
        url = ledger_url(config)
        ledger = open_ledger(url, **ledger_options(config, data_dir))
    except BaseException:
        authenticator.close()
        raise
    prices = PriceBook.load(pricing_path(config))
    guard = BudgetGuard.from_config(config, url, prices)
    if guard is not None:
        guard.start()  # stores the config's budgets, reconciles with the ledger
    core = MeteringCore.from_config(
        settings, telemetry, ledger=ledger, pricebook=prices, authenticator=authenticator,
        guard=guard,
    )
    routers = [make_keys_router(authenticator)]
    if guard is not None:
        routers.append(make_budgets_router(lambda: guard.store, authenticator,
                                           timezone=guard.zone.key, currency=guard.currency))
    if telemetry.config.prometheus:
        routers.append(_metrics_router(telemetry, authenticator))
    detector = detector_from_config(
        config, url, spool_pending=lambda: ledger.health().spool_pending,
        on_anomaly=functools.partial(_anomaly_span, telemetry))
    if detector is not None:
        detector.start()
    if not url.startswith("jsonl://"):
        reader = functools.cache(lambda: LedgerReader(url))
        routers.append(
            make_usage_router(reader, authenticator, timezone=config["billing"]["timezone"])
        )
        routers.append(make_dashboard_router(
            reader, authenticator, timezone=config["billing"]["timezone"],
            currency=prices.currency, get_store=lambda: guard.store if guard else None))
    return Metering(
        core,
        telemetry,
        ledger,
        [MeteringServerInterceptor(core)],
        lambda app: MeteringMiddleware(app, core),
        routers,
        authenticator,
        guard,
        detector,
    )
