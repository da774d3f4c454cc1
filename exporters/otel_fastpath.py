"""The metering fast paths, and the one module that uses private OpenTelemetry SDK names.

Why fast paths: a synchronous SDK measurement costs ~15-25 us of CPU (attribute cleaning,
hashing once per metric reader; we have two, OTLP and Prometheus), and the SDK's OTLP span
encoder builds ~4 protobuf objects per attribute. Metering the cheapest call (a health
check) was dominated by that. Each shortcut exports exactly what the stock SDK path does:

- :class:`FastHistogram`: explicit-bucket histogram aggregated in a dict; merged into every
  reader's collection by :func:`attach_histograms` as ordinary cumulative ``Histogram``
  metrics in our instrumentation scope;
- :class:`PreAggregatedCounter`: a monotonic counter summed in a dict and reported through
  an ObservableCounter (public API only; here because it is one of the shortcuts);
- :func:`wire_encoded_span_exporter`: the stock OTLP/gRPC span exporter with its request
  built from exporters/otlp_wire.py's bytes, which gets the SDK's own encoders (resource,
  scope, and spans it does not handle itself) from :func:`sdk_span_encoders`.

One correctness fix needs SDK internals too and lives here for that reason:
:func:`latest_only_prometheus_reader` (on in both modes).

SDK private names, used nowhere else in paddle-meter:
``MetricReader._collect`` / ``_set_collect_callback`` / ``_instrument_class_temporality``;
``OTLPSpanExporter._translate_data``; ``opentelemetry.exporter.otlp.proto.common._internal``
(``_encode_resource``, ``_encode_instrumentation_scope``, ``trace_encoder._encode_span``,
``trace_encoder._SPAN_KIND_MAP``); ``PrometheusMetricReader._receive_metrics`` and its
``_collector._metrics_datas``.

Checked against opentelemetry-api / -sdk / -proto / -exporter-otlp (and its -proto-common,
-proto-grpc) 1.45.2 and opentelemetry-exporter-prometheus 0.66b2; pyproject.toml pins those
minor versions. Before widening the pins run tests/test_otlp_wire.py and
tests/test_metering_plain_sdk.py, which compare these paths with the stock SDK path.

``TelemetryConfig(fast_path=False)`` turns the three shortcuts off: the metering core then
uses SDK ``Counter`` / ``Histogram`` instruments and the stock ``OTLPSpanExporter``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
    _SPAN_KIND_MAP,
    _encode_span,
)
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = [
    "FastHistogram",
    "PreAggregatedCounter",
    "SdkSpanEncoders",
    "attach_histograms",
    "latest_only_prometheus_reader",
    "sdk_span_encoders",
    "wire_encoded_span_exporter",
]


# --- histograms -------------------------------------------------------------------------
class FastHistogram:
    """A cumulative explicit-bucket histogram aggregated under one uncontended lock.

    Same aggregation as the SDK's (``bisect_left`` over the boundaries); exported only
    through readers it was attached to with :func:`attach_histograms`.
    """

    __slots__ = ("name", "unit", "description", "_bounds", "_points", "_lock", "_start_ns")

    def __init__(
        self, name: str, *, unit: str, description: str, boundaries: Sequence[float]
    ) -> None:
        self.name, self.unit, self.description = name, unit, description
        self._bounds = tuple(float(b) for b in boundaries)
        # key -> [attributes, bucket counts, count, sum, min, max]
        self._points: dict[Hashable, list[Any]] = {}
        self._lock = threading.Lock()
        self._start_ns = time.time_ns()

    def record(
        self, value: float, key: Hashable, attributes: Mapping[str, Any] | Iterable[tuple[str, Any]]
    ) -> None:
        """Add ``value`` to the series ``key``; ``attributes`` (that series' labels as a
        mapping or (name, value) pairs, the same for every call with this key) are
        copied only the first time the key is seen."""
        index = bisect_left(self._bounds, value)
        with self._lock:
            point = self._points.get(key)
            if point is None:
                counts = [0] * (len(self._bounds) + 1)
                point = self._points[key] = [dict(attributes), counts, 0, 0.0, value, value]
            point[1][index] += 1
            point[2] += 1
            point[3] += value
            if value < point[4]:
                point[4] = value
            elif value > point[5]:
                point[5] = value

    def metric(self, now_ns: int) -> Metric | None:
        """The cumulative totals so far as an SDK ``Metric``; None before any record."""
        with self._lock:
            rows = [(p[0], list(p[1]), p[2], p[3], p[4], p[5]) for p in self._points.values()]
        if not rows:
            return None
        points = [
            HistogramDataPoint(
                attributes=attrs,
                start_time_unix_nano=self._start_ns,
                time_unix_nano=now_ns,
                count=count,
                sum=total,
                bucket_counts=counts,
                explicit_bounds=self._bounds,
                min=low,
                max=high,
            )
            for attrs, counts, count, total, low, high in rows
        ]
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=Histogram(
                data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
            ),
        )


def _wants_cumulative(reader: MetricReader) -> bool:
    temporality = getattr(reader, "_instrument_class_temporality", {})
    return temporality.get(SdkHistogram, AggregationTemporality.CUMULATIVE) == (
        AggregationTemporality.CUMULATIVE
    )


def attach_histograms(
    readers: Sequence[MetricReader],
    histograms: Sequence[FastHistogram],
    resource: Resource,
    scope: InstrumentationScope,
) -> bool:
    """Make every reader's collection include ``histograms``.

    Wraps (never replaces) the collect callback the MeterProvider set on each reader.
    Returns False, attaching nothing, when a reader wants delta histograms or is not
    registered with a MeterProvider yet: the caller then uses SDK histograms.
    """
    if not all(_wants_cumulative(r) and getattr(r, "_collect", None) for r in readers):
        return False
    for reader in readers:
        reader._set_collect_callback(_merging(reader._collect, histograms, resource, scope))
    return True


def _merging(
    inner: Any,
    histograms: Sequence[FastHistogram],
    resource: Resource,
    scope: InstrumentationScope,
) -> Any:
    def collect(reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
        data = inner(reader, timeout_millis=timeout_millis)
        now_ns = time.time_ns()
        extra = [m for m in (h.metric(now_ns) for h in histograms) if m is not None]
        if not extra:
            return data
        ours = ScopeMetrics(scope=scope, metrics=extra, schema_url=scope.schema_url or "")
        if data is None or not data.resource_metrics:
            return MetricsData(
                resource_metrics=[
                    ResourceMetrics(
                        resource=resource,
                        schema_url=resource.schema_url,
                        scope_metrics=[ours],
                    )
                ]
            )
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, scope_metrics in enumerate(scopes):
            if scope_metrics.scope == scope:
                scopes[i] = dataclasses.replace(
                    scope_metrics, metrics=[*scope_metrics.metrics, *extra]
                )
                break
        else:
            scopes.append(ours)
        return MetricsData(
            resource_metrics=[dataclasses.replace(first, scope_metrics=scopes), *rest]
        )

    return collect


# --- counters -----------------------------------------------------------------------------
class PreAggregatedCounter:
    """A monotonic counter summed in a dict and reported through an ObservableCounter.

    Adding to a dict under an uncontended lock costs well under 1 us; the cumulative totals
    are reported at collection time, exactly what a cumulative counter exports.
    ``add(value, key)`` takes the attribute values in ``keys`` order; None values are left
    out of the attributes.
    """

    def __init__(
        self, meter: Meter, name: str, keys: Sequence[str], *, unit: str, description: str
    ) -> None:
        self._keys = tuple(keys)
        self._totals: dict[tuple, int] = {}
        self._lock = threading.Lock()
        meter.create_observable_counter(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def add(self, value: int, key: tuple) -> None:
        with self._lock:
            self._totals[key] = self._totals.get(key, 0) + value

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            totals = list(self._totals.items())
        keys = self._keys
        return [
            Observation(total, {k: v for k, v in zip(keys, key, strict=True) if v is not None})
            for key, total in totals
        ]


# --- span export --------------------------------------------------------------------------
class SdkSpanEncoders(NamedTuple):
    """The SDK's own OTLP encoders that exporters/otlp_wire.py builds on."""

    encode_resource: Callable[[Any], Any]  # Resource -> protobuf Resource
    encode_scope: Callable[[Any], Any]  # InstrumentationScope | None -> protobuf scope
    encode_span: Callable[[Any], Any]  # ReadableSpan -> protobuf Span
    span_kinds: Mapping[Any, int]  # SpanKind -> OTLP enum value


def sdk_span_encoders() -> SdkSpanEncoders:
    """The encoders of the installed opentelemetry-exporter-otlp-proto-common."""
    return SdkSpanEncoders(
        _encode_resource, _encode_instrumentation_scope, _encode_span, dict(_SPAN_KIND_MAP)
    )


def wire_encoded_span_exporter(base: type, encode: Callable[[Sequence[Any]], bytes]) -> type:
    """A subclass of the OTLP/gRPC span exporter ``base`` whose request comes from ``encode``.

    ``encode(spans)`` returns an ExportTraceServiceRequest's bytes (exporters/otlp_wire.py);
    parsing them is C work (upb), far cheaper than the SDK building the message.
    """

    class WireEncodedSpanExporter(base):  # type: ignore[misc, valid-type]
        """The stock OTLP/gRPC span exporter with wire-format encoding."""

        def _translate_data(self, data: Sequence[Any]) -> Any:
            return ExportTraceServiceRequest.FromString(encode(data))

    return WireEncodedSpanExporter


# --- Prometheus ---------------------------------------------------------------------------
def latest_only_prometheus_reader(reader_class: type) -> type:
    """A subclass of PrometheusMetricReader that keeps only the newest collection.

    Upstream queues every collection (MeterProvider.force_flush collects from all readers)
    and a scrape then renders each queued copy: the same series appears once per flush.
    Our temporality is cumulative, so the newest collection is the whole truth.
    """

    class LatestOnlyPrometheusReader(reader_class):  # type: ignore[misc, valid-type]
        def _receive_metrics(self, metrics_data: Any, *args: Any, **kwargs: Any) -> None:
            pending = getattr(getattr(self, "_collector", None), "_metrics_datas", None)
            if metrics_data is not None and pending is not None:
                pending.clear()
            super()._receive_metrics(metrics_data, *args, **kwargs)

    return LatestOnlyPrometheusReader
