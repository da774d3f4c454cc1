"""The metering core: one metered call per request, shared by every transport.

The gRPC interceptor (interceptors/grpc_aio.py) and the ASGI middleware
(interceptors/asgi.py) translate transport details into :meth:`MeteringCore.start_call`
and :meth:`MeteredCall.finish`. Here: the process-wide pieces (tenant resolution, the
instruments and tenant-label cap, the stage hook that makes model stages child spans,
error counting) and opening a call (W3C context extraction, the SERVER span, the
per-request :class:`models.usage.RequestUsage`). Finishing a call (record, ledger write,
span attributes, metrics, response metadata) is interceptors/call.py and the modules it
names; the billing rules are interceptors/billing_policy.py.

Failure policy (billing truth is the ledger):
- the ledger write happens inside ``finish``, before the response leaves. If the record
  cannot be built or the sink raises (LedgerWriteError or anything else), ``finish``
  raises LedgerWriteError and the transport fails the request (gRPC UNAVAILABLE / HTTP
  503, "usage could not be recorded; retry with the same x-request-id"): a
  served-but-unbilled response must not happen;
- any other failure inside metering (span attributes, metrics, pricing) is logged with
  its type only, counted in ``paddle_meter.meter_errors``, and never fails the request.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from exporters import semconv as sc
from exporters.ledger.base import UsageSink
from exporters.otel import Telemetry
from interceptors.billing_policy import LEDGER_FAILURE_MESSAGE
from interceptors.call import MeteredCall
from interceptors.instruments import Instruments, TenantCap
from interceptors.request_id import carried_request_id
from models import usage as usage_mod
from models.usage import RequestUsage

__all__ = ["LEDGER_FAILURE_MESSAGE", "MeteredCall", "MeteringCore", "default_tenant_resolver"]

log = logging.getLogger(__name__)

_TRACECONTEXT = TraceContextTextMapPropagator()
_NO_PARENT = Context()
_BAGGAGE = W3CBaggagePropagator()
_TENANT = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_CORE_OPTIONS = ("enabled", "record_content", "max_tenants_in_metrics")
# The stage hook models.usage holds is process-global; this remembers which core's hook
# it is, so close() never removes the hook of a newer core. (models.usage offers no
# getter; hooks installed by code other than a MeteringCore are not tracked.)
_stage_hook_owner: MeteringCore | None = None


def default_tenant_resolver(carrier: Mapping[str, str]) -> str:
    """Tenant from the ``x-tenant`` header/metadata, ``default`` when absent or malformed.

    The one place tenants are decided; the authentication work replaces this function
    (pass ``tenant_resolver=`` to :class:`MeteringCore`).
    """
    tenant = carrier.get(sc.HEADER_TENANT, "").strip()
    return tenant if _TENANT.match(tenant) else sc.DEFAULT_TENANT


class MeteringCore:
    """Opens and finishes metered calls; one per server process, shared by all transports.

    ``enabled=False`` (config ``metering.enabled: false``) makes transports pass calls straight
    through: no span, no record, no stage hook. The stage hook is process-global
    (models.usage), so the most recently built enabled core owns it until :meth:`close`.
    ``tenant_labels`` maps tenants to metric labels (capped at ``tenant_cap``).
    """

    def __init__(
        self,
        telemetry: Telemetry | None,
        *,
        ledger: UsageSink | None = None,
        pricebook: Any | None = None,
        tenant_resolver: Callable[[Mapping[str, str]], str] = default_tenant_resolver,
        enabled: bool = True,
        record_content: bool = False,
        tenant_cap: int = sc.DEFAULT_TENANT_CAP,
    ) -> None:
        if enabled and telemetry is None:
            raise ValueError("an enabled MeteringCore needs a Telemetry (see setup_telemetry)")
        self.enabled = enabled
        self.telemetry = telemetry
        self.ledger = ledger
        self.pricebook = pricebook
        self.record_content = record_content
        self._resolve_tenant = tenant_resolver
        self.tenant_labels = TenantCap(tenant_cap)
        if enabled:
            assert telemetry is not None
            self.tracer = telemetry.tracer
            self.instruments = Instruments(telemetry)
            self._own_stage_hook()

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | None,
        telemetry: Telemetry | None,
        *,
        ledger: UsageSink | None = None,
        pricebook: Any | None = None,
    ) -> MeteringCore:
        """Build from the config file's ``metering`` block: ``enabled`` (bool; false is
        "metering off", for benchmarks), ``record_content`` (bool),
        ``max_tenants_in_metrics`` (int). Raises ValueError on unknown keys or values."""
        values = dict(config or {})
        unknown = sorted(set(values) - set(_CORE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown metering option(s) {unknown}; known: {list(_CORE_OPTIONS)}")
        enabled = values.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"metering.enabled must be true or false, not {enabled!r}")
        return cls(
            telemetry,
            ledger=ledger,
            pricebook=pricebook,
            enabled=enabled,
            record_content=bool(values.get("record_content", False)),
            tenant_cap=int(values.get("max_tenants_in_metrics", sc.DEFAULT_TENANT_CAP)),
        )

    def close(self) -> None:
        """Remove the stage hook if this core installed the current one; idempotent."""
        global _stage_hook_owner
        if self.enabled and _stage_hook_owner is self:
            _stage_hook_owner = None
            usage_mod.set_stage_factory(None)

    def _own_stage_hook(self) -> None:
        global _stage_hook_owner
        usage_mod.set_stage_factory(self._stage)
        _stage_hook_owner = self

    def start_call(
        self,
        *,
        protocol: str,
        endpoint: str,
        span_name: str,
        carrier: Mapping[str, str],
        attributes: Mapping[str, Any],
        operation: str | None = None,
    ) -> MeteredCall:
        """Open the SERVER span (parent = the caller's W3C context) and the usage object.

        ``carrier`` is the request's headers/metadata with lower-case keys. Never raises
        for bad input: a malformed traceparent starts a new trace, a bad id is replaced.
        """
        # No traceparent: a new trace (an explicit empty context, never the ambient one).
        parent = _TRACECONTEXT.extract(carrier) if "traceparent" in carrier else _NO_PARENT
        if "baggage" in carrier:
            parent = _BAGGAGE.extract(carrier, parent)
        span = self.tracer.start_span(
            span_name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        usage = RequestUsage(operation=operation)
        usage.trace_link = span.get_span_context()
        return MeteredCall(
            self,
            protocol,
            endpoint,
            span,
            usage,
            carried_request_id(carrier),
            self._resolve_tenant(carrier),
            dict(attributes),  # a copy: transports may keep adding to theirs
        )

    def _stage(
        self, name: str, attributes: Mapping[str, Any], links: Sequence[Any]
    ) -> contextlib.AbstractContextManager[Any]:
        """models.usage stage hook: a child span of the current request span."""
        try:
            span_links = [Link(h) for h in links if isinstance(h, SpanContext)]
            ctx = None
            if not trace.get_current_span().get_span_context().is_valid:
                # Code running outside the request's context (a batching thread): fall
                # back to the bound usage's handle so the stage still joins the trace.
                usage = usage_mod.current_usage()
                if usage is not None and isinstance(usage.trace_link, SpanContext):
                    ctx = trace.set_span_in_context(NonRecordingSpan(usage.trace_link))
            return self.tracer.start_as_current_span(
                name, context=ctx, attributes=dict(attributes) or None, links=span_links or None
            )
        except Exception as exc:
            self.count_error("stage", exc)
            return contextlib.nullcontext()

    def count_error(self, where: str, exc: BaseException, request_id: str | None = None) -> None:
        """Log (type only: carriers and messages may hold secrets) and count a failure."""
        log.warning(
            "metering error in %s: %s",
            where,
            type(exc).__name__,
            extra={"where": where, "error_type": type(exc).__name__, "request_id": request_id},
        )
        with contextlib.suppress(Exception):
            attrs = {"where": where, sc.ERROR_TYPE: type(exc).__name__}
            self.instruments.meter_errors.add(1, attrs)
