"""Cheap explicit-bucket histograms for the per-call path, exported through every reader.

Why: one synchronous SDK ``Histogram.record`` costs ~25 us of CPU on this machine, most of
it hashing the attribute dict once per metric reader (we have two: OTLP and Prometheus).
The transport-duration histogram is recorded on EVERY call, health checks included, so
it dominated the cost of metering the cheapest call. :class:`FastHistogram` keeps the
same explicit-bucket aggregation (``bisect_left`` over the boundaries, as the SDK does)
in a dict keyed by a caller-chosen hashable key, and :func:`attach` makes each reader's
collection include these histograms as ordinary cumulative ``Histogram`` metrics in our
instrumentation scope, so the collector and ``/metrics`` see exactly what an SDK
histogram of the same name would give.

The one SDK internal used is the reader's collect callback (``MetricReader._collect``,
set by the MeterProvider): it is wrapped, not replaced. Readers that want DELTA
histograms are not supported by this path; :func:`attach` returns False for them and the
caller falls back to SDK histograms.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from bisect import bisect_left
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

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

__all__ = ["FastHistogram", "attach"]


class FastHistogram:
    """A cumulative explicit-bucket histogram aggregated under one uncontended lock."""

    __slots__ = ("name", "unit", "description", "_bounds", "_points", "_lock", "_start_ns")

    def __init__(self, name: str, *, unit: str, description: str,
                 boundaries: Sequence[float]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self._bounds = tuple(float(b) for b in boundaries)
        # key -> [attributes, bucket counts, count, sum, min, max]
        self._points: dict[Hashable, list[Any]] = {}
        self._lock = threading.Lock()
        self._start_ns = time.time_ns()

    def record(self, value: float, key: Hashable,
               attributes: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
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
                attributes=attrs, start_time_unix_nano=self._start_ns, time_unix_nano=now_ns,
                count=count, sum=total, bucket_counts=counts, explicit_bounds=self._bounds,
                min=low, max=high,
            )
            for attrs, counts, count, total, low, high in rows
        ]
        return Metric(
            name=self.name, description=self.description, unit=self.unit,
            data=Histogram(data_points=points,
                           aggregation_temporality=AggregationTemporality.CUMULATIVE),
        )


def _wants_cumulative(reader: MetricReader) -> bool:
    temporality = getattr(reader, "_instrument_class_temporality", {})
    return temporality.get(SdkHistogram, AggregationTemporality.CUMULATIVE) == (
        AggregationTemporality.CUMULATIVE)


def attach(readers: Sequence[MetricReader], histograms: Sequence[FastHistogram],
           resource: Resource, scope: InstrumentationScope) -> bool:
    """Make every reader's collection include ``histograms``; False (nothing attached)
    when a reader wants delta histograms or a reader is not registered yet."""
    if not all(_wants_cumulative(r) and getattr(r, "_collect", None) for r in readers):
        return False
    for reader in readers:
        reader._set_collect_callback(_merging(reader._collect, histograms, resource, scope))
    return True


def _merging(inner: Any, histograms: Sequence[FastHistogram], resource: Resource,
             scope: InstrumentationScope) -> Any:
    def collect(reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
        data = inner(reader, timeout_millis=timeout_millis)
        now_ns = time.time_ns()
        extra = [m for m in (h.metric(now_ns) for h in histograms) if m is not None]
        if not extra:
            return data
        if data is None or not data.resource_metrics:
            return MetricsData(resource_metrics=[ResourceMetrics(
                resource=resource, schema_url=resource.schema_url,
                scope_metrics=[ScopeMetrics(scope=scope, metrics=extra,
                                            schema_url=scope.schema_url or "")],
            )])
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, scope_metrics in enumerate(scopes):
            if scope_metrics.scope == scope:
                scopes[i] = dataclasses.replace(
                    scope_metrics, metrics=[*scope_metrics.metrics, *extra])
                break
        else:
            scopes.append(ScopeMetrics(scope=scope, metrics=extra,
                                       schema_url=scope.schema_url or ""))
        return MetricsData(resource_metrics=[
            dataclasses.replace(first, scope_metrics=scopes), *rest])

    return collect
