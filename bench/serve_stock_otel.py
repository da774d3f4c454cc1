"""Bench-only launcher: the real paddle-meter server plus the STOCK OTel gRPC interceptor.

What it runs: exactly what ``paddle-meter serve --config FILE`` runs in a single-worker
process (``load_config`` -> logging -> :class:`serving.app.PaddleMeterServer`), with one
addition: ``opentelemetry-instrumentation-grpc``'s ``aio_server_interceptor`` appended to
the gRPC interceptors, exporting its spans through a BatchSpanProcessor + OTLP/gRPC span
exporter configured by the standard ``OTEL_*`` variables (the same collector the metering
mode exports to). Run it with ``metering: {enabled: false}`` to measure the stock
instrumentation alone. Product code is untouched: this file exists only for
bench/bench_metering.py.

    .venv/bin/python bench/serve_stock_otel.py --config FILE
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from serving.app import PaddleMeterServer, serve_forever
from serving.config import load_config
from serving.logs import setup_logging


class StockOtelServer(PaddleMeterServer):
    """PaddleMeterServer whose gRPC server also carries the stock OTel interceptor."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.stock_provider = TracerProvider(
            resource=Resource.create({"service.name": "paddle-meter-stock-otel"})
        )
        self.stock_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))

    async def _start_grpc(self) -> None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        assert self.metering is not None
        # The one bench-only change: the stock interceptor joins whatever metering built
        # (nothing when metering is off).
        self.metering.grpc_interceptors = [
            *self.metering.grpc_interceptors,
            aio_server_interceptor(tracer_provider=self.stock_provider),
        ]
        await super()._start_grpc()

    async def stop(self) -> None:
        await super().stop()
        await asyncio.to_thread(self.stock_provider.shutdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    config = load_config(args.config)
    if int(config["server"]["workers"]) != 1:
        parser.error("the stock-OTel bench launcher runs one worker only")
    setup_logging(config["logging"]["level"], config["logging"]["format"])
    serve_forever(config, StockOtelServer)


if __name__ == "__main__":
    main()
