"""The metering core's OTel instruments and the tenant-label cap.

Created once per :class:`interceptors.core.MeteringCore` from the injected
:class:`exporters.otel.Telemetry`; names and buckets come from exporters/semconv.py.
``telemetry.config.fast_path`` picks the instruments: the pre-aggregated ones of
exporters/otel_fastpath.py (default), or plain SDK ``Counter`` / ``Histogram``. Either way
every instrument takes the same call signature, so the emitting code
(interceptors/telemetry_out.py) does not know which it has.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.metrics import Meter

from exporters import semconv as sc
from exporters.otel import Telemetry
from exporters.otel_fastpath import FastHistogram, PreAggregatedCounter, attach_histograms

__all__ = [
    "REQUEST_KEYS",
    "TOKEN_KEYS",
    "Instruments",
    "PlainCounter",
    "PlainHistogram",
    "TenantCap",
]

# Attribute names, in key-tuple order, of the request and token counters.
# The API key id is absent (None, so no label) while authentication is off.
REQUEST_KEYS = (
    sc.PADDLE_METER_PROTOCOL,
    sc.GEN_AI_REQUEST_MODEL,
    sc.GEN_AI_OPERATION_NAME,
    sc.PADDLE_METER_TENANT,
    sc.PADDLE_METER_API_KEY_ID,
    sc.PADDLE_METER_STATUS,
)
TOKEN_KEYS = (
    sc.PADDLE_METER_PROTOCOL,
    sc.GEN_AI_REQUEST_MODEL,
    sc.GEN_AI_OPERATION_NAME,
    sc.PADDLE_METER_TENANT,
    sc.PADDLE_METER_API_KEY_ID,
    sc.GEN_AI_TOKEN_TYPE,
)


class PlainCounter:
    """An SDK ``Counter`` behind :meth:`PreAggregatedCounter.add`'s signature."""

    __slots__ = ("_counter", "_keys")

    def __init__(
        self, meter: Meter, name: str, keys: Sequence[str], *, unit: str, description: str
    ) -> None:
        self._keys = tuple(keys)
        self._counter = meter.create_counter(name, unit=unit, description=description)

    def add(self, value: int, key: tuple) -> None:
        attrs = {k: v for k, v in zip(self._keys, key, strict=True) if v is not None}
        self._counter.add(value, attrs)


class PlainHistogram:
    """An SDK ``Histogram`` behind :meth:`FastHistogram.record`'s signature."""

    __slots__ = ("_histogram",)

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram

    def record(
        self, value: float, key: Hashable, attributes: Mapping[str, Any] | Iterable[tuple[str, Any]]
    ) -> None:
        self._histogram.record(value, dict(attributes))


class Instruments:
    """Every metric the core records, created from ``telemetry.meter``.

    ``tokens`` / ``requests`` take ``add(value, key)`` (attribute values in
    :data:`TOKEN_KEYS` / :data:`REQUEST_KEYS` order); ``rpc_duration`` / ``http_duration``
    take ``record(value, key, attributes)``. With the fast path they are
    :class:`PreAggregatedCounter` and :class:`FastHistogram` (the latter only when every
    reader wants cumulative histograms; SDK histograms otherwise).
    """

    def __init__(self, telemetry: Telemetry) -> None:
        meter = telemetry.meter
        fast = telemetry.config.fast_path
        counter: Any = PreAggregatedCounter if fast else PlainCounter
        self.tokens = counter(
            meter,
            sc.METRIC_TOKENS,
            TOKEN_KEYS,
            unit="{token}",
            description="Billable tokens, by type",
        )
        self.requests = counter(
            meter,
            sc.METRIC_REQUESTS,
            REQUEST_KEYS,
            unit="{request}",
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
        fast_histograms = [
            FastHistogram(
                name, unit="s", description=description, boundaries=sc.TRANSPORT_DURATION_BUCKETS
            )
            for name, description in durations
        ]
        if fast and attach_histograms(
            telemetry.metric_readers, fast_histograms, telemetry.resource, telemetry.scope
        ):
            self.rpc_duration, self.http_duration = fast_histograms
        else:
            self.rpc_duration, self.http_duration = (
                PlainHistogram(
                    meter.create_histogram(
                        name,
                        unit="s",
                        description=description,
                        explicit_bucket_boundaries_advisory=sc.TRANSPORT_DURATION_BUCKETS,
                    )
                )
                for name, description in durations
            )
        self.meter_errors = meter.create_counter(
            sc.METRIC_METER_ERRORS,
            unit="{error}",
            description="Failures inside metering (the request itself was served)",
        )
        self.auth_failures = meter.create_counter(
            sc.METRIC_AUTH_FAILURES,
            unit="{attempt}",
            description="Calls refused by authentication or authorization, by reason (never billed)",
        )
        # Per model call only (a few SDK measurements against milliseconds of inference).
        self.characters = meter.create_counter(
            sc.METRIC_CHARACTERS,
            unit="{character}",
            description="Billed recognised characters (OCR)",
        )
        self.pages = meter.create_counter(
            sc.METRIC_PAGES,
            unit="{page}",
            description="Billed OCR pages (1 per image, N per N-page PDF)",
        )
        self.cost = meter.create_counter(
            sc.METRIC_COST,
            unit="{currency}",
            description="Billed cost in the price table's currency (paddle_meter.currency)",
        )
        self.truncated_inputs = meter.create_counter(
            sc.METRIC_TRUNCATED_INPUTS,
            unit="{request}",
            description="Model calls whose input was cut to the model's limit (max_seq_len)",
        )
        self.limit_refusals = meter.create_counter(
            sc.METRIC_LIMIT_REFUSALS,
            unit="{request}",
            description="Calls refused by a budget or a rate limit, by reason (never billed)",
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
        """The metric label for ``tenant``: itself, or the overflow label past the cap."""
        if tenant in self._seen:
            return tenant
        with self._lock:
            if tenant in self._seen:
                return tenant
            if len(self._seen) < self._cap:
                self._seen.add(tenant)
                return tenant
        return sc.TENANT_OVERFLOW
