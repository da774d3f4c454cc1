"""An OTLP/gRPC receiver for tests: the end of the pipe a real collector exports to.

`OtlpSink` is a small real gRPC server on a loopback port 0 that implements
opentelemetry-proto's trace, metrics and logs collector services and keeps every
export request it receives, so a test can assert on what actually came out of
the collector (``rotel-agent``, see collector.py) rather than on SDK internals.

Reading is by flattening: `spans()` gives one plain dict per span,
`metric_points(name)` one dict per data point, and `metric_sum` folds cumulative
and delta points into the total a counter stands for. All readers are
thread-safe and never block, except the ``wait_for_*`` helpers, which poll until
a condition holds and raise `TimeoutError` (listing what did arrive) when not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

__all__ = ["OtlpSink", "any_value", "attributes_dict"]

_SPAN_KINDS = {
    0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER",
}
_STATUS_CODES = {0: "UNSET", 1: "OK", 2: "ERROR"}
_TEMPORALITIES = {0: None, 1: "delta", 2: "cumulative"}


def any_value(value: common_pb2.AnyValue) -> Any:
    """Convert an OTLP AnyValue to the plain Python value it carries."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_dict(value.kvlist_value.values)
    return getattr(value, kind)


def attributes_dict(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    """Convert repeated OTLP KeyValue pairs to a dict."""
    return {pair.key: any_value(pair.value) for pair in pairs}


def _matches(attributes: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(attributes.get(key) == value for key, value in wanted.items())


def _freeze(attributes: dict[str, Any]) -> tuple:
    return tuple(sorted((key, repr(value)) for key, value in attributes.items()))


class _Servicer(
    trace_service_pb2_grpc.TraceServiceServicer,
    metrics_service_pb2_grpc.MetricsServiceServicer,
    logs_service_pb2_grpc.LogsServiceServicer,
):
    """One Export method serves all three services: each appends to the sink."""

    def __init__(self, sink: OtlpSink) -> None:
        self._sink = sink

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._sink._receive(request)


class OtlpSink:
    """Real OTLP/gRPC collector endpoint on loopback that stores what it receives.

    Use as a context manager or call `start()` / `stop()`. `endpoint` is the
    ``host:port`` to export to (plaintext gRPC, compression accepted).
    """

    def __init__(self, *, host: str = "127.0.0.1", max_workers: int = 4) -> None:
        self._host = host
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self._port = 0
        self._cond = threading.Condition()
        self._traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self._logs: list[logs_service_pb2.ExportLogsServiceRequest] = []

    # lifecycle -------------------------------------------------------------
    def start(self) -> OtlpSink:
        """Bind a free loopback port and start serving; returns self. Idempotent."""
        if self._server is not None:
            return self
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers))
        servicer = _Servicer(self)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(servicer, server)
        self._port = server.add_insecure_port(f"{self._host}:0")
        server.start()
        self._server = server
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving (blocks up to `grace` seconds). Idempotent."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> OtlpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """``host:port`` the sink listens on (valid after `start`)."""
        if self._server is None:
            raise RuntimeError("OtlpSink is not started")
        return f"{self._host}:{self._port}"

    def _receive(self, request: Any) -> Any:
        with self._cond:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self._traces.append(request)
                response: Any = trace_service_pb2.ExportTraceServiceResponse()
            elif isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                self._metrics.append(request)
                response = metrics_service_pb2.ExportMetricsServiceResponse()
            else:
                self._logs.append(request)
                response = logs_service_pb2.ExportLogsServiceResponse()
            self._cond.notify_all()
        return response

    def clear(self) -> None:
        """Forget everything received so far."""
        with self._cond:
            self._traces.clear()
            self._metrics.clear()
            self._logs.clear()

    def received_bytes(self) -> bytes:
        """Everything received so far, as serialized OTLP requests: to search for text
        that must never be exported (a secret), whatever field it would hide in."""
        with self._cond:
            requests = [*self._traces, *self._metrics, *self._logs]
        return b"".join(request.SerializeToString() for request in requests)

    # traces ----------------------------------------------------------------
    def spans(self) -> list[dict[str, Any]]:
        """Every span received, flattened, in arrival order.

        Keys: name, trace_id, span_id, parent_span_id (lower-case hex, "" when
        absent), kind ("SERVER", ...), status_code ("UNSET"/"OK"/"ERROR"),
        status_message, attributes, resource (resource attributes), scope,
        start_time_unix_nano, end_time_unix_nano, events ([{name, attributes}]),
        links ([{trace_id, span_id, attributes}]).
        """
        with self._cond:
            requests = list(self._traces)
        out = []
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = attributes_dict(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        out.append(_span_dict(span, resource, scope_spans.scope.name))
        return out

    def wait_for_spans(
        self,
        predicate: Callable[[dict[str, Any]], bool] = lambda span: True,
        timeout: float = 10.0,
        count: int = 1,
    ) -> list[dict[str, Any]]:
        """Block until at least `count` spans satisfy `predicate`; return them all.

        Raises TimeoutError naming the spans that did arrive.
        """
        return self._wait(lambda: [s for s in self.spans() if predicate(s)], count, timeout,
                          lambda: f"spans received: {[s['name'] for s in self.spans()]}")

    # metrics ---------------------------------------------------------------
    def metric_names(self) -> list[str]:
        """Names of every metric received, sorted, without duplicates."""
        with self._cond:
            requests = list(self._metrics)
        return sorted({metric.name for request in requests
                       for rm in request.resource_metrics
                       for sm in rm.scope_metrics for metric in sm.metrics})

    def metric_points(self, name: str) -> list[dict[str, Any]]:
        """Every data point of metric `name`, flattened, in arrival order.

        Keys: name, type ("sum"/"gauge"/"histogram"/"exponential_histogram"/
        "summary"), temporality ("cumulative"/"delta"/None), monotonic, unit,
        attributes, resource, scope, start_time_unix_nano, time_unix_nano, and
        value (sum and gauge) or sum/count/min/max/bucket_counts/explicit_bounds
        (histograms).
        """
        with self._cond:
            requests = list(self._metrics)
        out = []
        for request in requests:
            for resource_metrics in request.resource_metrics:
                resource = attributes_dict(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.name == name:
                            out.extend(_metric_points(metric, resource, scope_metrics.scope.name))
        return out

    def metric_sum(self, name: str, **attr_filter: Any) -> float:
        """Total a counter (sum value) or histogram (sum of observations) stands for.

        Only points whose attributes include every ``key=value`` of `attr_filter`
        count (dotted keys: ``**{"gen_ai.token.type": "input"}``). Delta points
        are added up; for cumulative points only the latest point of each series
        counts, a series being one (resource, scope, attributes, start time), so
        repeated exports of the same counter are not double counted while a
        restarted exporter (new start time) still adds its own total.
        """
        return self._fold(name, "value", attr_filter)

    def metric_count(self, name: str, **attr_filter: Any) -> float:
        """Number of observations a histogram stands for; same folding as `metric_sum`."""
        return self._fold(name, "count", attr_filter)

    def wait_for_metric_sum(
        self, name: str, expected: float, timeout: float = 10.0, **attr_filter: Any
    ) -> float:
        """Block until `metric_sum(name, **attr_filter)` equals `expected`; return it.

        Raises TimeoutError with the last sum seen.
        """
        def probe() -> list[float]:
            total = self.metric_sum(name, **attr_filter)
            return [total] if total == expected else []

        self._wait(probe, 1, timeout,
                   lambda: f"{name} sum is {self.metric_sum(name, **attr_filter)}, "
                           f"want {expected}; metrics seen: {self.metric_names()}")
        return expected

    def _fold(self, name: str, field: str, attr_filter: dict[str, Any]) -> float:
        total = 0.0
        latest: dict[tuple, dict[str, Any]] = {}
        for point in self.metric_points(name):
            if not _matches(point["attributes"], attr_filter):
                continue
            # Histograms carry their total in "sum"; counters and gauges in "value".
            key_field = "sum" if field == "value" and "sum" in point else field
            if point["temporality"] == "delta":
                total += point.get(key_field) or 0
                continue
            series = (_freeze(point["resource"]), point["scope"], _freeze(point["attributes"]),
                      point["start_time_unix_nano"])
            seen = latest.get(series)
            if seen is None or point["time_unix_nano"] >= seen["time_unix_nano"]:
                latest[series] = dict(point, _field=key_field)
        total += sum(point.get(point["_field"]) or 0 for point in latest.values())
        return total

    # logs ------------------------------------------------------------------
    def log_records(self) -> list[dict[str, Any]]:
        """Every log record received: body, severity_text, attributes, resource, trace_id."""
        with self._cond:
            requests = list(self._logs)
        return [
            {
                "body": any_value(record.body),
                "severity_text": record.severity_text,
                "attributes": attributes_dict(record.attributes),
                "resource": attributes_dict(resource_logs.resource.attributes),
                "trace_id": record.trace_id.hex(),
            }
            for request in requests
            for resource_logs in request.resource_logs
            for scope_logs in resource_logs.scope_logs
            for record in scope_logs.log_records
        ]

    # helpers ---------------------------------------------------------------
    def _wait(self, probe: Callable[[], list], count: int, timeout: float,
              describe: Callable[[], str]) -> list:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = probe()
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"waited {timeout}s; {describe()}")
                # Woken by every export; the cap re-checks in case of a missed wake-up.
                self._cond.wait(min(remaining, 0.5))


def _span_dict(span: Any, resource: dict[str, Any], scope: str) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "kind": _SPAN_KINDS.get(span.kind, str(span.kind)),
        "status_code": _STATUS_CODES.get(span.status.code, str(span.status.code)),
        "status_message": span.status.message,
        "attributes": attributes_dict(span.attributes),
        "resource": resource,
        "scope": scope,
        "start_time_unix_nano": span.start_time_unix_nano,
        "end_time_unix_nano": span.end_time_unix_nano,
        "events": [{"name": e.name, "attributes": attributes_dict(e.attributes)}
                   for e in span.events],
        "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex(),
                   "attributes": attributes_dict(link.attributes)} for link in span.links],
    }


def _metric_points(metric: Any, resource: dict[str, Any], scope: str) -> list[dict[str, Any]]:
    kind = metric.WhichOneof("data")
    if kind is None:
        return []
    data = getattr(metric, kind)
    base = {
        "name": metric.name,
        "type": kind,
        "unit": metric.unit,
        "temporality": _TEMPORALITIES.get(getattr(data, "aggregation_temporality", 0)),
        "monotonic": getattr(data, "is_monotonic", None),
        "resource": resource,
        "scope": scope,
    }
    out = []
    for point in data.data_points:
        item = dict(base, attributes=attributes_dict(point.attributes),
                    start_time_unix_nano=point.start_time_unix_nano,
                    time_unix_nano=point.time_unix_nano)
        if kind in ("sum", "gauge"):
            item["value"] = getattr(point, point.WhichOneof("value") or "as_int")
        else:
            item["sum"] = point.sum
            item["count"] = point.count
            if kind == "histogram":
                item["bucket_counts"] = list(point.bucket_counts)
                item["explicit_bounds"] = list(point.explicit_bounds)
            if kind != "summary":
                item["min"] = point.min if point.HasField("min") else None
                item["max"] = point.max if point.HasField("max") else None
        out.append(item)
    return out
