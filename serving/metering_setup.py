"""Assemble metering for a serving process from config: telemetry, ledger, prices, core.

Returns the pieces the transports need (gRPC interceptors, an ASGI wrapper, extra HTTP
routes such as /metrics) and one ``shutdown`` that flushes them in the right order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from fastapi import APIRouter

__all__ = ["Metering", "build_metering"]


@dataclasses.dataclass
class Metering:
    grpc_interceptors: list[grpc.aio.ServerInterceptor]
    wrap_asgi: Callable[[Any], Any]
    http_routers: list[APIRouter]
    shutdown: Callable[[], None]


def build_metering(config: Mapping[str, Any], data_dir: Path) -> Metering:
    return Metering([], lambda app: app, [], lambda: None)
