"""The metering core: one metered call per request, shared by every transport.

The gRPC interceptor (interceptors/grpc_aio.py) and the ASGI middleware
(interceptors/asgi.py) translate transport details into :meth:`MeteringCore.start_call`
and :meth:`MeteredCall.finish`. Here: the process-wide pieces (tenant resolution, the
instruments and tenant-label cap, the stage hook that makes model stages child spans,
error counting) and opening a call (W3C context extraction, the SERVER span, the
per-request :class:`models.usage.RequestUsage`). Finishing a call (record, ledger write,
span attributes, metrics, response metadata) is interceptors/call.py and the modules it
names; the billing rules are interceptors/billing_policy.py.

Failure policy (billing truth is the ledger; the rules are interceptors/billing_policy.py):
- fail closed at start: :meth:`MeteringCore.start_call` raises ServingError for a call it
  will not meter (malformed ``x-request-id`` / ``x-tenant``: ``invalid_argument``; a
  ledger that can accept nothing: ``unavailable``), and the transport answers it without
  running the handler; any other exception while starting is turned by
  :meth:`MeteringCore.start_refusal` into ``unavailable`` "metering could not start";
- the ledger write happens inside ``finish``, before the response leaves. If the record
  cannot be built or the sink raises, or the ledger's answer makes the call a refused
  reuse of a request id, ``finish`` raises ServingError and the transport replaces the
  response: a served-but-unbilled response must not happen;
- any other failure inside metering (span attributes, metrics, pricing) is logged with
  its type only, counted in ``paddle_meter.meter_errors``, and never fails the request.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from auth.roles import Permission
from exporters import semconv as sc
from exporters.ledger.base import ReportsHealth, UsageSink
from exporters.otel import Telemetry
from interceptors.billing_policy import (
    DEFAULT_MAX_REPLAYS,
    LEDGER_CANNOT_ACCEPT_MESSAGE,
    LEDGER_FAILURE_MESSAGE,
    NON_BILLABLE_OPERATIONS,
    START_FAILURE_MESSAGE,
)
from interceptors.budget_metrics import BudgetMetrics
from interceptors.call import MeteredCall
from interceptors.instruments import Instruments, TenantCap
from interceptors.ledger_metrics import LedgerMetrics
from interceptors.model_statistics import PROCESS_STATISTICS, ModelStatistics
from interceptors.request_id import carried_request_id, carried_tenant
from models import usage as usage_mod
from models.usage import RequestUsage
from serving.errors import ServingError

if TYPE_CHECKING:
    from auth.authenticator import Authenticator
    from billing.budget_guard import BudgetGuard

__all__ = ["LEDGER_FAILURE_MESSAGE", "MeteredCall", "MeteringCore", "default_tenant_resolver"]

log = logging.getLogger(__name__)

_TRACECONTEXT = TraceContextTextMapPropagator()
_NO_PARENT = Context()
_BAGGAGE = W3CBaggagePropagator()
# W3C Trace Context / Baggage headers longer than this are ignored (a new trace).
_MAX_PROPAGATION_HEADER = 512
_CORE_OPTIONS = ("enabled", "record_content", "max_tenants_in_metrics", "max_replays")
# The stage hook models.usage holds is process-global; this remembers which core's hook
# it is, so close() never removes the hook of a newer core. (models.usage offers no
# getter; hooks installed by code other than a MeteringCore are not tracked.)
_stage_hook_owner: MeteringCore | None = None


def _parent(carrier: Mapping[str, str]) -> Context:
    """The caller's W3C trace context and baggage; an empty context (a new trace) when
    absent, malformed or over-long (never the ambient one)."""
    parent = _NO_PARENT
    traceparent = carrier.get("traceparent")
    if traceparent is not None and len(traceparent) <= _MAX_PROPAGATION_HEADER:
        parent = _TRACECONTEXT.extract(carrier)
    baggage = carrier.get("baggage")
    if baggage is not None and len(baggage) <= _MAX_PROPAGATION_HEADER:
        parent = _BAGGAGE.extract(carrier, parent)
    return parent


def default_tenant_resolver(carrier: Mapping[str, str]) -> str:
    """Tenant from the ``x-tenant`` header/metadata, ``default`` when absent; a malformed
    one raises ServingError ``invalid_argument`` (interceptors/request_id.py).

    The tenant while authentication is off (``auth.mode: off``); with keys the tenant is
    the key's (auth/authenticator.py). Pass ``tenant_resolver=`` to :class:`MeteringCore`
    to replace it; it may raise ServingError too.
    """
    return carried_tenant(carrier)


class MeteringCore:
    """Opens and finishes metered calls; one per server process, shared by all transports.

    ``enabled=False`` (config ``metering.enabled: false``) makes transports pass calls straight
    through: no span, no record, no stage hook. The stage hook is process-global
    (models.usage), so the most recently built enabled core owns it until :meth:`close`.
    ``tenant_labels`` maps tenants to metric labels (capped at ``tenant_cap``).
    ``max_replays``: how often one (tenant, request id) may be replayed (billing_policy.py).
    ``model_stats``: where Triton's per-model statistics are counted (default: the
    process's, interceptors/model_statistics.py, which the OIP frontends read).
    A ledger implementing ReportsHealth is asked ``can_accept()`` at each call's start and
    its health is exported as metrics (interceptors/ledger_metrics.py).
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
        max_replays: int = DEFAULT_MAX_REPLAYS,
        authenticator: Authenticator | None = None,
        guard: BudgetGuard | None = None,
        model_stats: ModelStatistics | None = None,
    ) -> None:
        if enabled and telemetry is None:
            raise ValueError("an enabled MeteringCore needs a Telemetry (see setup_telemetry)")
        if isinstance(max_replays, bool) or not isinstance(max_replays, int) or max_replays < 0:
            raise ValueError(f"metering.max_replays must be an integer >= 0, not {max_replays!r}")
        self.enabled = enabled
        self.telemetry = telemetry
        self.ledger = ledger
        self.pricebook = pricebook
        self.record_content = record_content
        self.max_replays = max_replays
        self._resolve_tenant = tenant_resolver
        # Only a ``required`` authenticator admits calls; ``off`` keeps the tenant resolver.
        self.auth = authenticator if authenticator is not None and authenticator.required else None
        self.tenant_labels = TenantCap(tenant_cap)
        # Triton's statistics extension, counted where each call's ledger record is made.
        self.model_stats = PROCESS_STATISTICS if model_stats is None else model_stats
        # Budgets and rate limits (billing/budget_guard.py): reserved before inference.
        self.guard = guard
        # Checked once here: isinstance against a runtime Protocol is slow per call.
        self._ledger_health = ledger if isinstance(ledger, ReportsHealth) else None
        self._ledger_metrics: LedgerMetrics | None = None
        self._budget_metrics: BudgetMetrics | None = None
        if enabled:
            assert telemetry is not None
            self.tracer = telemetry.tracer
            self.instruments = Instruments(telemetry)
            if self._ledger_health is not None:
                self._ledger_metrics = LedgerMetrics(telemetry.meter, self._ledger_health)
            if guard is not None:
                self._budget_metrics = BudgetMetrics(telemetry.meter, guard)
            self._own_stage_hook()

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | None,
        telemetry: Telemetry | None,
        *,
        ledger: UsageSink | None = None,
        pricebook: Any | None = None,
        authenticator: Authenticator | None = None,
        guard: BudgetGuard | None = None,
    ) -> MeteringCore:
        """Build from the config file's ``metering`` block: ``enabled`` (bool; false is
        "metering off", for benchmarks), ``record_content`` (bool),
        ``max_tenants_in_metrics`` (int), ``max_replays`` (int >= 0, default 10).
        Raises ValueError on unknown keys or values."""
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
            max_replays=values.get("max_replays", DEFAULT_MAX_REPLAYS),
            authenticator=authenticator,
            guard=guard,
        )

    def close(self) -> None:
        """Remove the stage hook if this core installed the current one and stop the
        ledger metrics; idempotent."""
        global _stage_hook_owner
        if self._ledger_metrics is not None:
            self._ledger_metrics.close()
        if self._budget_metrics is not None:
            self._budget_metrics.close()
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
        may_bill: bool = True,
        access: tuple[Permission, bool] = (Permission.AUTHENTICATED, False),
        peer: str | None = None,
    ) -> MeteredCall:
        """Admit the call, then open the SERVER span (parent = the caller's W3C context)
        and the usage object.

        ``carrier`` is the request's headers/metadata with lower-case keys; ``access`` the
        endpoint's (permission, key may come in the body) from auth/roles.py; ``peer`` the
        client's address. Raises ServingError when the call must not be served (fail
        closed; nothing is opened): an authentication refusal (``unauthenticated`` /
        ``permission_denied`` / ``rate_limited``, given its own short span and counted in
        ``paddle_meter.auth.failures``), ``invalid_argument`` for a malformed
        ``x-request-id`` / ``x-tenant``, ``unavailable`` when the ledger can accept no
        records, unless the call cannot bill: ``operation`` is never billed (health,
        metadata ...) or the transport says ``may_bill=False`` (an HTTP GET), so health
        checks and reads stay answerable. A malformed or over-long traceparent / baggage
        is ignored (a new trace), as W3C Trace Context says.
        """
        admission = None
        auth = self.auth
        if auth is not None:
            try:
                admission = auth.admit(access[0], carrier, peer, body_credential=access[1])
            except ServingError as refusal:
                self.auth_refused(refusal, protocol, span_name, carrier, attributes)
                raise
            tenant = admission.tenant
        else:
            tenant = self._resolve_tenant(carrier)
        header_id = carried_request_id(carrier)
        health = self._ledger_health
        if (
            health is not None
            and may_bill
            and operation not in NON_BILLABLE_OPERATIONS
            and not health.can_accept()
        ):
            raise ServingError("unavailable", LEDGER_CANNOT_ACCEPT_MESSAGE)
        span = self.tracer.start_span(
            span_name, context=_parent(carrier), kind=SpanKind.SERVER, attributes=attributes
        )
        usage = RequestUsage(operation=operation)
        usage.trace_link = span.get_span_context()
        call = MeteredCall(
            self,
            protocol,
            endpoint,
            span,
            usage,
            header_id,
            tenant,
            dict(attributes),  # a copy: transports may keep adding to theirs
        )
        if self.guard is not None:
            usage.admission_hook = call.admit_usage
        if admission is not None:
            call.identity = admission.identity
            if admission.pending:  # the pipeline presents its body's api_key (auth/)
                call.await_credential(admission, carrier, peer)
        return call

    def auth_refused(
        self,
        refusal: ServingError,
        protocol: str,
        span_name: str | None = None,
        carrier: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
        *,
        span: trace.Span | None = None,
    ) -> None:
        """Meter an authentication refusal: counted by reason, and on ``span`` (else a
        short SERVER span of its own). Never a ledger record: nothing is billed."""
        reason = refusal.reason or refusal.kind
        with contextlib.suppress(Exception):
            self.instruments.auth_failures.add(
                1, {sc.PADDLE_METER_AUTH_FAILURE: reason, sc.PADDLE_METER_PROTOCOL: protocol}
            )
        try:
            own = span is None
            if own:
                span = self.tracer.start_span(
                    span_name or "unauthenticated",
                    context=_parent(carrier or {}),
                    kind=SpanKind.SERVER,
                    attributes=attributes,
                )
            assert span is not None
            span.set_attributes(
                {sc.PADDLE_METER_AUTH_FAILURE: reason, sc.ERROR_TYPE: refusal.kind}
            )
            span.set_status(Status(StatusCode.ERROR, refusal.message))
            if own:
                span.end()
        except Exception as exc:
            self.count_error("auth_span", exc)

    def limit_refused(self, refusal: ServingError, protocol: str, span: trace.Span) -> None:
        """Meter a budget or rate-limit refusal: counted by reason and on the call's span.
        Never a ledger record: nothing is billed."""
        reason = refusal.reason or refusal.kind
        with contextlib.suppress(Exception):
            self.instruments.limit_refusals.add(
                1, {sc.PADDLE_METER_LIMIT_REFUSAL: reason, sc.PADDLE_METER_PROTOCOL: protocol}
            )
        try:
            span.set_attributes({sc.PADDLE_METER_LIMIT_REFUSAL: reason, sc.ERROR_TYPE: refusal.kind})
        except Exception as exc:
            self.count_error("limit_span", exc)

    def start_refusal(self, exc: BaseException) -> ServingError:
        """What a transport answers when :meth:`start_call` raised ``exc``: the
        ServingError itself, or (anything else: a bug or a broken tenant resolver)
        ``unavailable`` "metering could not start", logged at ERROR with its stack but
        without its message (which may hold header values) and counted."""
        if isinstance(exc, ServingError):
            return exc
        log.error(
            "metering could not start: %s; the call was refused",
            type(exc).__name__,
            extra={
                "where": "start",
                "error_type": type(exc).__name__,
                "stack": "".join(traceback.format_tb(exc.__traceback__)),
            },
        )
        self.count_error("start", exc, log_it=False)
        return ServingError("unavailable", START_FAILURE_MESSAGE)

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

    def count_error(
        self,
        where: str,
        exc: BaseException,
        request_id: str | None = None,
        *,
        log_it: bool = True,
    ) -> None:
        """Log (type only: carriers and messages may hold secrets) and count a failure."""
        if log_it:
            log.warning(
                "metering error in %s: %s",
                where,
                type(exc).__name__,
                extra={"where": where, "error_type": type(exc).__name__, "request_id": request_id},
            )
        with contextlib.suppress(Exception):
            attrs = {"where": where, sc.ERROR_TYPE: type(exc).__name__}
            self.instruments.meter_errors.add(1, attrs)
