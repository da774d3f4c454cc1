"""What a finished call puts on its server span and into the metrics.

Called once per call by :meth:`interceptors.call.MeteredCall.finish`, after the ledger
write (so the span carries the record's price); the span is ended by the caller. Raises
whatever the SDK raises: the caller counts it in ``paddle_meter.meter_errors`` and never
fails the request for it. Usage attributes and the model-call histograms only appear
where there is a model: health calls stay cheap (each SDK measurement costs ~15 us).

A replay (``call.replay``, interceptors/billing_policy.py) puts the ORIGINAL billed figures
on its span with ``paddle_meter.usage.replay=True`` and adds nothing to
``paddle_meter.tokens`` (it still counts in ``paddle_meter.requests``), so token sums agree
with the ledger, which billed the key once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Status, StatusCode

from exporters import semconv as sc
from interceptors.billing_policy import billed_tokens

if TYPE_CHECKING:
    from interceptors.call import MeteredCall

__all__ = ["emit"]

_ABSENT = object()
# High-cardinality transport span attributes that must not become metric labels.
_NON_METRIC_TRANSPORT_ATTRS = frozenset({sc.URL_PATH, sc.SERVER_ADDRESS, sc.SERVER_PORT})


def emit(
    call: MeteredCall,
    *,
    ok: bool,
    status: str,
    error_message: str | None,
    duration_s: float,
    request_bytes: int,
    response_bytes: int,
    transport_attrs: Mapping[str, Any],
) -> None:
    """Set the span's attributes and status, and record the call's metrics."""
    _set_span(call, ok, status, error_message, request_bytes, response_bytes, transport_attrs)
    _record_metrics(call, ok, status, duration_s, request_bytes, response_bytes, transport_attrs)


def _set_span(
    call: MeteredCall,
    ok: bool,
    status: str,
    error_message: str | None,
    request_bytes: int,
    response_bytes: int,
    transport_attrs: Mapping[str, Any],
) -> None:
    usage, span, record, replay = call.usage, call.span, call.record, call.replay
    billed_in, billed_out = billed_tokens(usage, ok)
    start = call.start_attributes  # already on the span: not cleaned and set twice
    attrs: dict[str, Any] = {
        **{k: v for k, v in transport_attrs.items() if start.get(k, _ABSENT) != v},
        sc.PADDLE_METER_TENANT: call.tenant,
        sc.PADDLE_METER_REQUEST_ID: call.request_id,
        sc.PADDLE_METER_REQUEST_SIZE: request_bytes,
        sc.PADDLE_METER_RESPONSE_SIZE: response_bytes,
    }
    if call.identity is not None:
        attrs[sc.PADDLE_METER_API_KEY_ID] = call.identity.key_id
    if usage.model is not None:
        attrs[sc.GEN_AI_PROVIDER_NAME] = sc.GEN_AI_PROVIDER_PADDLE
        attrs[sc.GEN_AI_REQUEST_MODEL] = usage.model
        attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = usage.input_tokens
        attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = usage.output_tokens
        attrs[sc.PADDLE_METER_CHARACTERS] = usage.characters
        attrs[sc.PADDLE_METER_IMAGES] = usage.images
        attrs[sc.PADDLE_METER_PAGES] = usage.pages
        attrs[sc.PADDLE_METER_BILLABLE_TOKENS] = billed_in + billed_out
    if replay is not None:  # what the caller is told: the figures billed the first time
        attrs[sc.PADDLE_METER_USAGE_REPLAY] = True
        attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = replay.input_tokens
        attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = replay.output_tokens
        attrs[sc.PADDLE_METER_BILLABLE_TOKENS] = replay.billable_tokens
        record = replay  # its cost and price id below
    if usage.operation is not None:
        attrs[sc.GEN_AI_OPERATION_NAME] = usage.operation
    if usage.model_version:
        attrs[sc.PADDLE_METER_MODEL_VERSION] = usage.model_version
    if usage.truncated:
        attrs[sc.PADDLE_METER_TRUNCATED] = True
    if usage.app_status:
        attrs[sc.PADDLE_METER_APP_STATUS] = usage.app_status
    if record is not None and record.cost is not None:
        attrs[sc.PADDLE_METER_COST] = record.cost
        if record.price_id is not None:
            attrs[sc.PADDLE_METER_PRICE_ID] = record.price_id
    if not ok:
        attrs[sc.ERROR_TYPE] = status
        span.set_status(Status(StatusCode.ERROR, error_message or status))
    span.set_attributes(attrs)


def _record_metrics(
    call: MeteredCall,
    ok: bool,
    status: str,
    duration_s: float,
    request_bytes: int,
    response_bytes: int,
    transport_attrs: Mapping[str, Any],
) -> None:
    usage, ins = call.usage, call.core.instruments
    model_call = usage.model is not None
    billed_in, billed_out = billed_tokens(usage, ok)
    tenant_label = call.core.tenant_labels.label(call.tenant)
    base_key = (call.protocol, usage.model, usage.operation, tenant_label, call.api_key_id)
    ins.requests.add(1, (*base_key, status))
    if ok and model_call and call.replay is None:  # a replay was billed (and counted) before
        if billed_in:
            ins.tokens.add(billed_in, (*base_key, sc.GEN_AI_TOKEN_TYPE_INPUT))
        if billed_out:
            ins.tokens.add(billed_out, (*base_key, sc.GEN_AI_TOKEN_TYPE_OUTPUT))
        _record_usage(call, tenant_label)
    if model_call:
        attrs: dict[str, Any] = {
            sc.PADDLE_METER_PROTOCOL: call.protocol,
            sc.GEN_AI_PROVIDER_NAME: sc.GEN_AI_PROVIDER_PADDLE,
            sc.GEN_AI_REQUEST_MODEL: usage.model,
        }
        if usage.operation is not None:
            attrs[sc.GEN_AI_OPERATION_NAME] = usage.operation
        ins.gen_ai_duration.record(duration_s, attrs if ok else {**attrs, sc.ERROR_TYPE: status})
        ins.request_size.record(request_bytes, attrs)
        ins.response_size.record(response_bytes, attrs)
    duration = ins.rpc_duration if call.protocol == "grpc" else ins.http_duration
    # The label items double as the series key: no attribute dict per call.
    labels = tuple(
        item for item in transport_attrs.items() if item[0] not in _NON_METRIC_TRANSPORT_ATTRS
    )
    duration.record(duration_s, labels, labels)


def _record_usage(call: MeteredCall, tenant_label: str) -> None:
    """Characters, pages, cost and truncation of a call billed now (the record's figures)."""
    usage, ins, record = call.usage, call.core.instruments, call.record
    attrs: dict[str, Any] = {sc.GEN_AI_REQUEST_MODEL: usage.model,
                             sc.PADDLE_METER_TENANT: tenant_label}
    if usage.characters:
        ins.characters.add(usage.characters, attrs)
    if usage.pages:
        ins.pages.add(usage.pages, attrs)
    if usage.truncated:
        ins.truncated_inputs.add(1, attrs)
    if record is not None and record.cost:
        cost = float(record.cost)
        if cost:
            currency = getattr(call.core.pricebook, "currency", None) or "unknown"
            ins.cost.add(cost, {**attrs, sc.PADDLE_METER_CURRENCY: currency})
