"""One metered request: the object the metering core hands each transport.

Made by :meth:`interceptors.core.MeteringCore.start_call`; the transport wraps the handler
in ``with call.activate():`` and ends with ``await call.finish(...)``, which writes the
ledger record (before the response leaves), then the span attributes and the metrics.
Policies are described in interceptors/core.py and interceptors/__init__.py.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from exporters import semconv as sc
from exporters.ledger.base import LedgerWriteError
from exporters.usage_record import UsageRecord
from models import usage as usage_mod
from models.usage import RequestUsage

if TYPE_CHECKING:
    from interceptors.core import MeteringCore

__all__ = ["LEDGER_FAILURE_MESSAGE", "REQUEST_ID_PATTERN", "MeteredCall"]

LEDGER_FAILURE_MESSAGE = "usage could not be recorded; retry with the same x-request-id"
# Request ids key the bill (idempotency), so only plain tokens are accepted from callers.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# What the caller sees when the ledger write fails, per protocol: (status, attribute, value).
_LEDGER_FAILURE = {
    "grpc": ("UNAVAILABLE", sc.RPC_GRPC_STATUS_CODE, 14),
    "http": ("503", sc.HTTP_RESPONSE_STATUS_CODE, 503),
}
_NO_ATTRIBUTES: Mapping[str, Any] = {}


class MeteredCall:
    """One request being metered; made by :meth:`MeteringCore.start_call`.

    Use ``with call.activate():`` around the handler, then ``await call.finish(...)``
    before the response leaves, then send :meth:`response_metadata` to the caller.
    """

    __slots__ = (
        "core", "protocol", "endpoint", "span", "usage", "tenant", "record",
        "_header_id", "_request_id", "_start_ns", "_start_wall_ns", "_finished", "_ok",
        "_start_attrs", "_tokens",
    )

    def __init__(
        self,
        core: MeteringCore,
        protocol: str,
        endpoint: str,
        span: trace.Span,
        usage: RequestUsage,
        header_id: str | None,
        tenant: str,
        start_attributes: Mapping[str, Any] = _NO_ATTRIBUTES,
    ) -> None:
        self.core = core
        self.protocol = protocol
        self.endpoint = endpoint
        self.span = span
        self.usage = usage
        self.tenant = tenant
        self.record: UsageRecord | None = None
        self._header_id = header_id
        self._request_id: str | None = None
        self._start_wall_ns = time.time_ns()
        self._start_ns = time.perf_counter_ns()
        self._finished = False
        self._ok = False
        self._start_attrs = start_attributes
        self._tokens: tuple[Any, Any] | None = None

    def activate(self) -> MeteredCall:
        """``with call.activate():`` makes the server span current and binds the usage
        for the block (and any thread started from it with a copied context, e.g.
        ``asyncio.to_thread``). Not re-entrant."""
        return self

    def __enter__(self) -> RequestUsage:
        otel_token = otel_context.attach(trace.set_span_in_context(self.span))
        binding = usage_mod.bind_usage(self.usage)
        binding.__enter__()
        self._tokens = (otel_token, binding)
        return self.usage

    def __exit__(self, *exc_info: object) -> None:
        assert self._tokens is not None
        otel_token, binding = self._tokens
        self._tokens = None
        binding.__exit__(None, None, None)
        otel_context.detach(otel_token)

    @property
    def request_id(self) -> str:
        """Header ``x-request-id`` wins, then the frontend's protocol id, else 32 random hex."""
        if self._request_id is None:
            rid = self._header_id
            if rid is None and self.usage.request_id is not None:
                candidate = str(self.usage.request_id)
                rid = candidate if REQUEST_ID_PATTERN.match(candidate) else None
            self._request_id = rid or os.urandom(16).hex()  # a UUID4's worth of randomness
        return self._request_id

    def billable(self) -> bool:
        """Whether this call belongs in the ledger: model calls only, never health etc."""
        op = self.usage.operation
        return self.usage.model is not None and op not in sc.NON_BILLABLE_OPERATIONS

    def response_metadata(self) -> list[tuple[str, str]]:
        """``x-request-id`` and the billed token counts, for trailers / response headers.

        A call that is neither billable nor carries usage (health, metadata, ServerLive)
        gets only the echo of an id the request carried, or nothing: zero-token trailers
        and a random id tell the caller nothing and cost gRPC metadata work per call.
        """
        usage = self.usage
        if not (self.billable() or usage.input_tokens or usage.output_tokens):
            carried = self._header_id is not None or usage.request_id is not None
            return [(sc.HEADER_REQUEST_ID, self.request_id)] if carried else []
        ok = self._ok  # only a successful, finished call reports billed tokens
        return [
            (sc.HEADER_REQUEST_ID, self.request_id),
            (sc.HEADER_USAGE_INPUT_TOKENS, str(self.usage.input_tokens if ok else 0)),
            (sc.HEADER_USAGE_OUTPUT_TOKENS, str(self.usage.output_tokens if ok else 0)),
        ]

    async def finish(
        self,
        *,
        ok: bool,
        status: str,
        error_message: str | None = None,
        request_bytes: int = 0,
        response_bytes: int = 0,
        transport_attributes: Mapping[str, Any] | None = None,
    ) -> UsageRecord | None:
        """End the call: write the ledger record, then the span and metrics.

        ``ok``/``status`` are the transport outcome ("OK"/gRPC code name, HTTP status);
        a frontend's ``usage.app_status`` turns a transport success into an error.
        Returns the record written (None for non-billable calls). Raises
        LedgerWriteError when the record could not be made durable; the transport must
        then fail the request. Idempotent: a second call returns the first result.
        """
        if self._finished:
            return self.record
        self._finished = True
        core, usage = self.core, self.usage
        duration_s = (time.perf_counter_ns() - self._start_ns) / 1e9
        app_status = usage.app_status
        call_ok = ok and not app_status
        final_status = "ok" if call_ok else (app_status if ok and app_status else status)
        attrs = dict(transport_attributes or {})
        ledger_error: BaseException | None = None
        if self.billable():
            try:
                record = self._build_record(final_status, call_ok, duration_s,
                                            request_bytes, response_bytes)
                if core.ledger is not None:
                    await core.ledger.submit(record)
                self.record = record
            except Exception as exc:  # not built or not durable: the call must fail
                ledger_error = exc
                core.count_error("ledger", exc, self.request_id)
                final_status, key, value = _LEDGER_FAILURE[self.protocol]
                attrs[key] = value
                call_ok, error_message = False, LEDGER_FAILURE_MESSAGE
        try:
            self._emit(call_ok, final_status, error_message, duration_s,
                       request_bytes, response_bytes, attrs)
        except Exception as exc:
            core.count_error("emit", exc, self.request_id)
        finally:
            self.span.end()
        self._ok = call_ok
        if ledger_error is not None:
            raise LedgerWriteError(LEDGER_FAILURE_MESSAGE) from ledger_error
        return self.record

    def _build_record(
        self, status: str, ok: bool, duration_s: float, request_bytes: int, response_bytes: int
    ) -> UsageRecord:
        usage = self.usage
        ctx = self.span.get_span_context()
        ts = datetime.datetime.fromtimestamp(self._start_wall_ns / 1e9, datetime.timezone.utc)
        record = UsageRecord(
            request_id=self.request_id,
            ts=ts.isoformat(),
            duration_ms=round(duration_s * 1000.0, 3),
            tenant=self.tenant,
            api_key_id=None,
            model=usage.model or "",
            model_version=usage.model_version or "",
            operation=usage.operation or "",
            protocol=self.protocol,
            endpoint=self.endpoint,
            status=status,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            characters=usage.characters,
            images=usage.images,
            billable_tokens=usage.input_tokens + usage.output_tokens if ok else 0,
            request_bytes=request_bytes,
            response_bytes=response_bytes,
            trace_id=format(ctx.trace_id, "032x") if ctx.is_valid else None,
            span_id=format(ctx.span_id, "016x") if ctx.is_valid else None,
            content_sha256=usage.content_sha256,
            content=usage.content if self.core.record_content else None,
            truncated=usage.truncated,
        )
        if self.core.pricebook is not None:
            try:
                record.price_id, record.cost = self.core.pricebook.price(record)
            except Exception as exc:  # priced later from the ledger's token counts
                self.core.count_error("pricing", exc, record.request_id)
        return record

    def _emit(
        self,
        ok: bool,
        status: str,
        error_message: str | None,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
        transport_attrs: dict[str, Any],
    ) -> None:
        usage, span, ins = self.usage, self.span, self.core.instruments
        model_call = usage.model is not None
        billed_in, billed_out = (usage.input_tokens, usage.output_tokens) if ok else (0, 0)
        start = self._start_attrs  # already on the span: not cleaned and set twice
        span_attrs: dict[str, Any] = {
            **{k: v for k, v in transport_attrs.items() if start.get(k, _ABSENT) != v},
            sc.PADDLE_METER_TENANT: self.tenant,
            sc.PADDLE_METER_REQUEST_ID: self.request_id,
            sc.PADDLE_METER_REQUEST_SIZE: request_bytes,
            sc.PADDLE_METER_RESPONSE_SIZE: response_bytes,
        }
        metric_attrs: dict[str, Any] = {sc.PADDLE_METER_PROTOCOL: self.protocol}
        if model_call:
            # Usage attributes only where there is usage: health calls stay cheap.
            span_attrs[sc.GEN_AI_REQUEST_MODEL] = metric_attrs[sc.GEN_AI_REQUEST_MODEL] = (
                usage.model)
            span_attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = usage.input_tokens
            span_attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = usage.output_tokens
            span_attrs[sc.PADDLE_METER_CHARACTERS] = usage.characters
            span_attrs[sc.PADDLE_METER_IMAGES] = usage.images
            span_attrs[sc.PADDLE_METER_BILLABLE_TOKENS] = billed_in + billed_out
        if usage.operation is not None:
            span_attrs[sc.GEN_AI_OPERATION_NAME] = usage.operation
            metric_attrs[sc.GEN_AI_OPERATION_NAME] = usage.operation
        if usage.model_version:
            span_attrs[sc.PADDLE_METER_MODEL_VERSION] = usage.model_version
        if usage.truncated:
            span_attrs[sc.PADDLE_METER_TRUNCATED] = True
        if usage.app_status:
            span_attrs[sc.PADDLE_METER_APP_STATUS] = usage.app_status
        if self.record is not None and self.record.cost is not None:
            span_attrs[sc.PADDLE_METER_COST] = self.record.cost
            if self.record.price_id is not None:
                span_attrs[sc.PADDLE_METER_PRICE_ID] = self.record.price_id
        if not ok:
            span_attrs[sc.ERROR_TYPE] = status
            span.set_status(Status(StatusCode.ERROR, error_message or status))
        span.set_attributes(span_attrs)

        tenant_label = self.core._tenants.label(self.tenant)
        base_key = (self.protocol, usage.model, usage.operation, tenant_label)
        ins.requests.add(1, (*base_key, status))
        if ok and model_call:
            if billed_in:
                ins.tokens.add(billed_in, (*base_key, sc.GEN_AI_TOKEN_TYPE_INPUT))
            if billed_out:
                ins.tokens.add(billed_out, (*base_key, sc.GEN_AI_TOKEN_TYPE_OUTPUT))
        if model_call:
            # Model-call histograms; health/metadata calls only feed requests + duration,
            # each SDK measurement costing ~15 us of CPU.
            gen_attrs = metric_attrs if ok else {**metric_attrs, sc.ERROR_TYPE: status}
            ins.gen_ai_duration.record(duration_s, gen_attrs)
            ins.request_size.record(request_bytes, metric_attrs)
            ins.response_size.record(response_bytes, metric_attrs)
        duration = ins.rpc_duration if self.protocol == "grpc" else ins.http_duration
        # The label items double as the series key: no attribute dict per call.
        labels = tuple(item for item in transport_attrs.items()
                       if item[0] not in _NON_METRIC_TRANSPORT_ATTRS)
        duration.record(duration_s, labels, labels)


_ABSENT = object()

# High-cardinality transport span attributes that must not become metric labels.
_NON_METRIC_TRANSPORT_ATTRS = frozenset({sc.URL_PATH, sc.SERVER_ADDRESS, sc.SERVER_PORT})
