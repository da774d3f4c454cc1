"""The metering core's OTel instruments and the tenant-label cap.

Created once per :class:`interceptors.core.MeteringCore`; names and buckets come from
exporters/semconv.py. Private to interceptors/.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from exporters import semconv as sc
from interceptors._histogram import FastHistogram, attach


class _SdkHistogram:
    """An SDK histogram behind :meth:`FastHistogram.record`'s signature (the fallback)."""

    __slots__ = ("_histogram",)

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram

    def record(self, value: float, key: Hashable,
               attributes: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        self._histogram.record(value, dict(attributes))


class Instruments:
    """Every metric the core records, created from one injected meter.

    With ``telemetry`` given, the transport-duration histograms (recorded on every call)
    are :class:`interceptors._histogram.FastHistogram` exported through its readers;
    otherwise, or when a reader wants delta histograms, they are SDK histograms.
    Either way ``rpc_duration`` / ``http_duration`` take ``record(value, key, attributes)``.
    """

    def __init__(self, meter: Meter, telemetry: Any | None = None) -> None:
        self.tokens = PreAggregatedCounter(
            meter, sc.METRIC_TOKENS, TOKEN_KEYS, unit="{token}",
            description="Billable tokens, by type",
        )
        self.requests = PreAggregatedCounter(
            meter, sc.METRIC_REQUESTS, REQUEST_KEYS, unit="{request}",
            description="Metered requests, by status",
        )
        self.gen_ai_duration = meter.create_histogram(
            sc.METRIC_GEN_AI_SERVER_REQUEST_DURATION,
            unit="s",
            description="Model call duration as the server saw it",
            explicit_bucket_boundaries_advisory=sc.GEN_AI_DURATION_BUCKETS,
        )
        self.request_size = meter.create_histogram(
            sc.METRIC_REQUEST_SIZE,
            unit="By",
            description="Request body bytes as they crossed the wire",
            explicit_bucket_boundaries_advisory=sc.SIZE_BUCKETS,
        )
        self.response_size = meter.create_histogram(
            sc.METRIC_RESPONSE_SIZE,
            unit="By",
            description="Response body bytes as they crossed the wire",
            explicit_bucket_boundaries_advisory=sc.SIZE_BUCKETS,
        )
        durations = (
            (sc.METRIC_RPC_SERVER_CALL_DURATION, "gRPC server call duration"),
            (sc.METRIC_HTTP_SERVER_REQUEST_DURATION, "HTTP server request duration"),
        )
        fast = [
            FastHistogram(name, unit="s", description=description,
                          boundaries=sc.TRANSPORT_DURATION_BUCKETS)
            for name, description in durations
        ]
        if telemetry is not None and attach(
            telemetry.metric_readers, fast, telemetry.resource, telemetry.scope
        ):
            self.rpc_duration, self.http_duration = fast
        else:
            self.rpc_duration, self.http_duration = (
                _SdkHistogram(meter.create_histogram(
                    name, unit="s", description=description,
                    explicit_bucket_boundaries_advisory=sc.TRANSPORT_DURATION_BUCKETS))
                for name, description in durations
            )
        self.meter_errors = meter.create_counter(
            sc.METRIC_METER_ERRORS,
            unit="{error}",
            description="Failures inside metering (the request itself was served)",
        )


class TenantCap:
    """Maps tenants to metric label values: the first ``cap`` seen keep their name.

    Later tenants share :data:`exporters.semconv.TENANT_OVERFLOW`, so a flood of tenants
    cannot blow up metric cardinality. Spans and the ledger always carry the real tenant.
    """

    def __init__(self, cap: int = sc.DEFAULT_TENANT_CAP) -> None:
        if cap < 0:
            raise ValueError(f"tenant cap must be >= 0, not {cap}")
        self._cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def label(self, tenant: str) -> str:
        if tenant in self._seen:
            return tenant
        with self._lock:
            if tenant in self._seen:
                return tenant
            if len(self._seen) < self._cap:
                self._seen.add(tenant)
                return tenant
        return sc.TENANT_OVERFLOW


# Attribute names, in key-tuple order, of the pre-aggregated counters.
REQUEST_KEYS = (sc.PADDLE_METER_PROTOCOL, sc.GEN_AI_REQUEST_MODEL, sc.GEN_AI_OPERATION_NAME,
                sc.PADDLE_METER_TENANT, sc.PADDLE_METER_STATUS)
TOKEN_KEYS = (sc.PADDLE_METER_PROTOCOL, sc.GEN_AI_REQUEST_MODEL, sc.GEN_AI_OPERATION_NAME,
              sc.PADDLE_METER_TENANT, sc.GEN_AI_TOKEN_TYPE)


class PreAggregatedCounter:
    """A monotonic counter summed in a dict and reported through an ObservableCounter.

    Why: every synchronous SDK measurement costs ~15 us of CPU (attribute cleaning,
    hashing, one storage per reader); adding to a dict under an uncontended lock costs well
    under 1 us, and the cumulative totals are reported at collection time, exactly what a
    cumulative counter exports. ``add(value, key)`` takes the attribute values in
    ``keys`` order; None values are left out of the attributes.
    """

    def __init__(self, meter: Meter, name: str, keys: Sequence[str], *, unit: str,
                 description: str) -> None:
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
