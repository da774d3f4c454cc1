"""The metering core's OTel instruments and the tenant-label cap.

Created once per :class:`interceptors.core.MeteringCore`; names and buckets come from
exporters/semconv.py. Private to interceptors/.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from exporters import semconv as sc


class Instruments:
    """Every metric the core records, created from one injected meter."""

    def __init__(self, meter: Meter) -> None:
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
        self.rpc_duration = meter.create_histogram(
            sc.METRIC_RPC_SERVER_CALL_DURATION,
            unit="s",
            description="gRPC server call duration",
            explicit_bucket_boundaries_advisory=sc.TRANSPORT_DURATION_BUCKETS,
        )
        self.http_duration = meter.create_histogram(
            sc.METRIC_HTTP_SERVER_REQUEST_DURATION,
            unit="s",
            description="HTTP server request duration",
            explicit_bucket_boundaries_advisory=sc.TRANSPORT_DURATION_BUCKETS,
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
