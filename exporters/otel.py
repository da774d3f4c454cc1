"""OpenTelemetry setup for paddle-meter: one TracerProvider, one MeterProvider, no globals.

Called once at server start (``setup_telemetry``); the returned :class:`Telemetry` is
injected into the metering core and the HTTP app (``render_metrics`` for ``GET /metrics``).
Nothing here touches the global OTel providers, so tests build as many as they like.

Configuration comes from the config file's ``telemetry`` block and the standard
``OTEL_*`` environment variables. Where both set a value the environment wins, as the
OTel SDK specification has environment variables configure a deployed SDK:
``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]
{ENDPOINT,PROTOCOL,HEADERS,TIMEOUT}``, ``OTEL_SERVICE_NAME``, ``OTEL_METRIC_EXPORT_INTERVAL``.
Setting ``OTEL_EXPORTER_OTLP_ENDPOINT`` alone turns OTLP export on.
Queue sizes of the batch span processor come from ``OTEL_BSP_*`` through the SDK itself.

``TelemetryConfig.fast_path`` (default True) picks the fast paths of
exporters/otel_fastpath.py (wire-encoded OTLP/gRPC spans here; pre-aggregated metric
instruments in the metering core); False is the stock SDK path everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, UpDownCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Tracer

from exporters.otel_fastpath import latest_only_prometheus_reader, wire_encoded_span_exporter
from exporters.otlp_wire import SpanWireEncoder

__all__ = ["Telemetry", "TelemetryConfig", "package_version", "setup_telemetry"]

log = logging.getLogger(__name__)

SERVICE_NAME = "paddle-meter"
INSTRUMENTATION_SCOPE = "paddle_meter"
_EXPORTERS = ("otlp", "console", "none")
_PROTOCOLS = ("grpc", "http/protobuf")
# Cumulative everywhere, so the collector and /metrics agree on every sum.
_CUMULATIVE = {
    kind: AggregationTemporality.CUMULATIVE for kind in (Counter, Histogram, UpDownCounter)
}


# Config-file key -> (dataclass field, multiplier): the file speaks seconds, the SDK ms.
_FILE_KEYS: dict[str, tuple[str, float]] = {
    "exporter": ("exporter", 1),
    "otlp_protocol": ("protocol", 1),
    "otlp_endpoint": ("endpoint", 1),
    "otlp_headers": ("headers", 1),
    "otlp_timeout_s": ("timeout_s", 1),
    "metric_export_interval_s": ("export_interval_ms", 1000),
    "prometheus": ("prometheus", 1),
    "service_name": ("service_name", 1),
}


def package_version() -> str:
    """The installed paddle-meter version (the resource's ``service.version``), ``0.0.0``
    from a source tree that is not installed. Read here, not from serving/version.py
    (the server's own home of it), because exporters never import serving."""
    try:
        from importlib.metadata import version

        return version("paddle-meter")
    except Exception:  # not installed (a bare checkout): still a valid resource
        return "0.0.0"


def _parse_headers(raw: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` as OTEL_EXPORTER_OTLP_HEADERS writes it (values URL-encoded)."""
    from urllib.parse import unquote

    headers: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"OTLP header {item!r} is not key=value")
        headers[unquote(key.strip()).lower()] = unquote(value.strip())
    return headers


@dataclasses.dataclass(frozen=True)
class TelemetryConfig:
    """Where and how telemetry is exported. Build with :meth:`from_mapping`."""

    exporter: str = "none"  # otlp | console | none
    protocol: str = "grpc"  # grpc | http/protobuf
    endpoint: str | None = None  # base endpoint (http/protobuf appends /v1/traces ...)
    traces_endpoint: str | None = None  # signal-specific, used as-is
    metrics_endpoint: str | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    timeout_s: float = 10.0
    export_interval_ms: int = 60_000
    service_name: str = SERVICE_NAME
    service_version: str = dataclasses.field(default_factory=package_version)
    service_instance_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    prometheus: bool = True
    # Not a config-file key: the stock SDK path (False) is for tests and comparisons.
    fast_path: bool = True

    def __post_init__(self) -> None:
        if self.exporter not in _EXPORTERS:
            raise ValueError(
                f"telemetry exporter must be one of {_EXPORTERS}, not {self.exporter!r}"
            )
        if self.protocol not in _PROTOCOLS:
            raise ValueError(f"OTLP protocol must be one of {_PROTOCOLS}, not {self.protocol!r}")
        if self.timeout_s <= 0 or self.export_interval_ms <= 0:
            raise ValueError("telemetry timeout_s and export_interval_ms must be positive")

    @classmethod
    def from_mapping(
        cls, config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> TelemetryConfig:
        """The config file's ``telemetry`` block overlaid with the OTEL_* variables of ``env``.

        File keys: ``exporter``, ``otlp_protocol``, ``otlp_endpoint``, ``otlp_headers``
        (mapping), ``otlp_timeout_s``, ``metric_export_interval_s``, ``prometheus``,
        ``service_name``. ``env`` defaults to ``os.environ``; pass ``{}`` to ignore it.
        Raises ValueError on unknown keys or bad values.
        """
        values: dict[str, Any] = {}
        for key, value in dict(config or {}).items():
            if key not in _FILE_KEYS:
                raise ValueError(f"unknown telemetry option {key!r}; known: {sorted(_FILE_KEYS)}")
            if value is None:
                continue  # null in the file means "not set here"
            field, scale = _FILE_KEYS[key]
            values[field] = value * scale if scale != 1 else value
        env = os.environ if env is None else env

        def pick(*names: str) -> str | None:
            for name in names:
                value = env.get(name, "").strip()
                if value:
                    return value
            return None

        if (endpoint := pick("OTEL_EXPORTER_OTLP_ENDPOINT")) is not None:
            values["endpoint"] = endpoint
            values["exporter"] = "otlp"
        if (endpoint := pick("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) is not None:
            values["traces_endpoint"] = endpoint
            values["exporter"] = "otlp"
        if (endpoint := pick("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")) is not None:
            values["metrics_endpoint"] = endpoint
        if (exporter := pick("OTEL_TRACES_EXPORTER")) is not None:
            values["exporter"] = exporter.split(",")[0].strip().lower()
        if protocol := pick("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            values["protocol"] = protocol
        if (headers := pick("OTEL_EXPORTER_OTLP_HEADERS")) is not None:
            values["headers"] = _parse_headers(headers)
        if (timeout := pick("OTEL_EXPORTER_OTLP_TIMEOUT")) is not None:
            values["timeout_s"] = float(timeout) / 1000.0  # the spec's unit is ms
        if (interval := pick("OTEL_METRIC_EXPORT_INTERVAL")) is not None:
            values["export_interval_ms"] = int(interval)
        if (name := pick("OTEL_SERVICE_NAME")) is not None:
            values["service_name"] = name
        if pick("OTEL_SDK_DISABLED") == "true":
            values["exporter"] = "none"
        if values.get("exporter") == "otlp" and not (
            values.get("endpoint") or values.get("traces_endpoint")
        ):
            values["endpoint"] = (
                "http://localhost:4317"
                if values.get("protocol", "grpc") == "grpc"
                else "http://localhost:4318"
            )
        values["headers"] = dict(values.get("headers") or {})
        if "export_interval_ms" in values:
            values["export_interval_ms"] = int(values["export_interval_ms"])
        return cls(**values)

    def signal_endpoint(self, signal: str) -> str | None:
        """Endpoint for ``traces`` or ``metrics``, as the OTLP exporter spec derives it."""
        specific = self.traces_endpoint if signal == "traces" else self.metrics_endpoint
        if specific:
            return specific
        if not self.endpoint:
            return None
        if self.protocol == "http/protobuf":
            return self.endpoint.rstrip("/") + f"/v1/{signal}"
        return self.endpoint


def _otlp_exporters(cfg: TelemetryConfig) -> tuple[SpanExporter, Any]:
    headers = dict(cfg.headers) or None
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    span_class: type = OTLPSpanExporter
    if cfg.protocol == "grpc" and cfg.fast_path:
        span_class = wire_encoded_span_exporter(OTLPSpanExporter, SpanWireEncoder().encode)
    spans = span_class(
        endpoint=cfg.signal_endpoint("traces"), headers=headers, timeout=cfg.timeout_s
    )
    metrics = OTLPMetricExporter(
        endpoint=cfg.signal_endpoint("metrics"),
        headers=headers,
        timeout=cfg.timeout_s,
        preferred_temporality=_CUMULATIVE,
    )
    return spans, metrics


class Telemetry:
    """The process's tracer and meter providers plus the Prometheus exposition.

    Built by :func:`setup_telemetry`. ``tracer`` and ``meter`` are what the metering core
    uses; :meth:`render_metrics` serves ``GET /metrics`` from the same instruments.
    ``span_exporter`` is the configured span exporter (None with exporter ``none``).
    """

    def __init__(
        self,
        cfg: TelemetryConfig,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        prometheus_registry: Any | None,
        metric_readers: Sequence[MetricReader] = (),
        span_exporter: SpanExporter | None = None,
    ) -> None:
        self.config = cfg
        self.span_exporter = span_exporter
        # Every reader of meter_provider and the scope of ``meter``: the metering core
        # aggregates its hottest histogram itself and hands it to these readers.
        self.metric_readers: tuple[MetricReader, ...] = tuple(metric_readers)
        self.resource: Resource = tracer_provider.resource
        self.scope = InstrumentationScope(INSTRUMENTATION_SCOPE, cfg.service_version)
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.tracer: Tracer = tracer_provider.get_tracer(INSTRUMENTATION_SCOPE, cfg.service_version)
        self.meter: Meter = meter_provider.get_meter(INSTRUMENTATION_SCOPE, cfg.service_version)
        self._registry = prometheus_registry
        self._workers: Any | None = None
        self._lock = threading.Lock()
        self._shut_down = False

    def merge_workers(self, worker: int, workers: int, directory: Any) -> None:
        """With ``--workers N`` (N > 1): every scrape of this worker also carries its
        siblings' series, each labelled ``worker`` (exporters/worker_metrics.py)."""
        if self._registry is None or workers <= 1:
            return
        from prometheus_client.exposition import generate_latest

        from exporters.worker_metrics import WorkerMetrics

        registry = self._registry
        self._workers = WorkerMetrics(lambda: generate_latest(registry), worker=worker,
                                      workers=workers, directory=directory)
        self._workers.start()

    def render_metrics(self) -> tuple[bytes, str]:
        """Prometheus text exposition of every instrument: ``(body, content_type)``.

        Blocks while the SDK collects (microseconds to a few ms); call it from a thread
        or accept that cost on the event loop for a scrape every few seconds.
        """
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        if self._registry is None:
            return b"# prometheus exposition is turned off\n", CONTENT_TYPE_LATEST
        if self._workers is not None:
            return self._workers.render(), CONTENT_TYPE_LATEST
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export everything pending; False when an exporter timed out."""
        millis = int(timeout_s * 1000)
        spans_ok = self.tracer_provider.force_flush(millis)
        metrics_ok = self.meter_provider.force_flush(millis)
        return bool(spans_ok and metrics_ok)

    def shutdown(self) -> None:
        """Flush and stop both providers; idempotent, safe from any thread."""
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
        if self._workers is not None:
            self._workers.close()
        for provider in (self.tracer_provider, self.meter_provider):
            try:
                provider.shutdown()
            except Exception:  # a collector that is down must not stop shutdown
                log.warning("telemetry provider shutdown failed", exc_info=True)


def setup_telemetry(
    cfg: TelemetryConfig,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    metric_readers: Sequence[MetricReader] = (),
) -> Telemetry:
    """Build the providers for ``cfg``; never installs them globally.

    ``span_processors`` / ``metric_readers`` add to the configured exporters (tests pass
    an in-memory exporter and reader here). Spans go through a BatchSpanProcessor, so a
    slow or dead collector costs requests nothing: the bounded queue drops (and the SDK
    counts the drops) instead of blocking.
    """
    resource = Resource.create(
        {
            "service.name": cfg.service_name,
            "service.version": cfg.service_version,
            "service.instance.id": cfg.service_instance_id,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
        }
    )
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = list(metric_readers)
    span_exporter: SpanExporter | None = None
    if cfg.exporter == "otlp":
        span_exporter, metric_exporter = _otlp_exporters(cfg)
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        readers.append(
            PeriodicExportingMetricReader(
                metric_exporter, export_interval_millis=cfg.export_interval_ms
            )
        )
    elif cfg.exporter == "console":
        span_exporter = ConsoleSpanExporter()
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        readers.append(
            PeriodicExportingMetricReader(
                ConsoleMetricExporter(preferred_temporality=_CUMULATIVE),
                export_interval_millis=cfg.export_interval_ms,
            )
        )
    for processor in span_processors:
        tracer_provider.add_span_processor(processor)
    registry = None
    if cfg.prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        # A private registry: the global one would collide between providers (tests,
        # two servers in one process) and leak python_gc_* collectors into our output.
        registry = CollectorRegistry(auto_describe=True)
        readers.append(latest_only_prometheus_reader(PrometheusMetricReader)(registry=registry))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(cfg, tracer_provider, meter_provider, registry, readers, span_exporter)
