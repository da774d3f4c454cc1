"""One metered request: the object the metering core hands each transport.

Made by :meth:`interceptors.core.MeteringCore.start_call`; the transport wraps the handler
in ``with call.activate():`` and ends with ``await call.finish(...)``, then sends
:meth:`MeteredCall.response_metadata`. This module owns the call's lifecycle and the order
of the finishing steps; each step has its own home:

- interceptors/request_id.py: which request id the call carries;
- interceptors/billing_policy.py: whether it is billed, its billed tokens, pricing,
  replays and refusals of a reused request id, and failing the request when the record
  cannot be made durable;
- interceptors/record.py: the :class:`exporters.usage_record.UsageRecord`;
- interceptors/telemetry_out.py: span attributes and metrics;
- interceptors/response_meta.py: ``x-request-id`` / ``x-usage-*`` for the caller.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from auth import context as auth_context
from auth.authenticator import MISSING_KEY_MESSAGE
from exporters import semconv as sc
from exporters.usage_record import UsageRecord
from interceptors.billing_policy import (
    LEDGER_FAILURE_MESSAGE,
    is_billable,
    price_record,
    refusal_status,
    settle,
)
from interceptors.model_statistics import CallClock, bind_clock, unbind_clock
from interceptors.record import build_record
from interceptors.request_id import resolve_request_id
from interceptors.response_meta import usage_metadata
from interceptors.telemetry_out import emit
from models import usage as usage_mod
from models.usage import RequestUsage
from serving.errors import ServingError

if TYPE_CHECKING:
    from auth.authenticator import Admission
    from auth.roles import Identity
    from billing.budget_guard import Reservation
    from exporters.ledger.base import BilledRecord
    from interceptors.core import MeteringCore

__all__ = ["LEDGER_FAILURE_MESSAGE", "MeteredCall"]

_NO_ATTRIBUTES: Mapping[str, Any] = {}


class MeteredCall:
    """One request being metered; made by :meth:`MeteringCore.start_call`.

    Use ``with call.activate():`` around the handler, then ``await call.finish(...)``
    before the response leaves, then send :meth:`response_metadata` to the caller.
    Read-only for the steps: ``header_request_id`` (the caller's valid ``x-request-id``),
    ``start_attributes`` (already on the span), ``start_wall_ns``, ``ok`` (True once a
    finished call succeeded), ``record`` (the record written, if any) and ``replay`` (on a
    replay: the figures billed the first time, which the caller is told).
    """

    __slots__ = (
        "core",
        "protocol",
        "endpoint",
        "span",
        "usage",
        "tenant",
        "record",
        "replay",
        "header_request_id",
        "start_attributes",
        "start_wall_ns",
        "ok",
        "identity",
        "auth_pending",
        "auth_refusal",
        "limit_refusal",
        "reservation",
        "clock",
        "_auth_carrier",
        "_request_id",
        "_start_ns",
        "_finished",
        "_tokens",
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
        self.replay: BilledRecord | None = None
        self.header_request_id = header_id
        self.start_attributes = start_attributes
        self.start_wall_ns = time.time_ns()
        self.ok = False
        self.identity: Identity | None = None
        # Set while the key may still come in the body (pipeline); cleared once admitted.
        self.auth_pending: Admission | None = None
        self.auth_refusal: ServingError | None = None
        # A budget / rate-limit refusal (never billed) and the reservation held otherwise.
        self.limit_refusal: ServingError | None = None
        self.reservation: Reservation | None = None
        # Stage durations the serving code adds (interceptors/model_statistics.py).
        self.clock = CallClock()
        self._auth_carrier: tuple[Mapping[str, str], str | None] | None = None
        self._request_id: str | None = None
        self._start_ns = time.perf_counter_ns()
        self._finished = False
        self._tokens: tuple[Any, ...] | None = None

    def activate(self) -> MeteredCall:
        """``with call.activate():`` makes the server span current and binds the usage
        for the block (and any thread started from it with a copied context, e.g.
        ``asyncio.to_thread``). Not re-entrant."""
        return self

    def __enter__(self) -> RequestUsage:
        otel_token = otel_context.attach(trace.set_span_in_context(self.span))
        binding = usage_mod.bind_usage(self.usage)
        binding.__enter__()
        identity = (
            auth_context.bind_identity(self.identity) if self.identity is not None else None
        )
        self._tokens = (otel_token, binding, identity, bind_clock(self.clock))
        return self.usage

    def __exit__(self, *exc_info: object) -> None:
        assert self._tokens is not None
        otel_token, binding, identity, clock = self._tokens
        self._tokens = None
        unbind_clock(clock)
        if identity is not None:
            auth_context.reset_identity(identity)
        binding.__exit__(None, None, None)
        otel_context.detach(otel_token)

    @property
    def api_key_id(self) -> str | None:
        """The id of the key that made the call (never the key); None with auth off."""
        identity = self.identity
        return identity.key_id if identity is not None else None

    def await_credential(
        self, admission: Admission, carrier: Mapping[str, str], peer: str | None
    ) -> None:
        """Admitted pending: the frontend presents the body's key via
        ``usage.credential_hook`` (:meth:`present_credential`) before any model work."""
        self.auth_pending = admission
        self._auth_carrier = (carrier, peer)
        self.usage.credential_hook = self.present_credential

    def present_credential(self, key: str | None) -> None:
        """The key the request body carried (None: none). Admits the call (its tenant
        becomes the key's) or raises the refusal, which is metered here and never billed."""
        pending = self.auth_pending
        self.usage.credential_hook = None
        if pending is None or self.core.auth is None or self._auth_carrier is None:
            return
        carrier, peer = self._auth_carrier
        try:
            admission = self.core.auth.admit_body(pending, key, carrier, peer)
        except ServingError as refusal:
            self.auth_refusal = refusal
            self.core.auth_refused(refusal, self.protocol, span=self.span)
            raise
        self.auth_pending = None
        self.identity, self.tenant = admission.identity, admission.tenant

    async def admit_usage(self, served: Any, items: Sequence[Any]) -> None:
        """``usage.admission_hook``: reserve what the call will bill on its budgets and
        rate limits before the model runs (billing/budget_guard.py), or raise the refusal,
        which is metered here and never billed."""
        self.usage.admission_hook = None
        guard = self.core.guard
        if guard is None or not guard.applies(self.tenant, self.api_key_id):
            return
        estimate = await served.estimate(items)
        try:
            self.reservation = await guard.reserve(
                tenant=self.tenant,
                key_id=self.api_key_id,
                model=self.usage.model or "",
                operation=self.usage.operation or "",
                started_at=datetime.datetime.fromtimestamp(
                    self.start_wall_ns / 1e9, datetime.timezone.utc
                ),
                request_id=self.request_id,
                estimate=estimate,
            )
        except ServingError as refusal:
            self.limit_refusal = refusal
            self.core.limit_refused(refusal, self.protocol, self.span)
            raise

    @property
    def request_id(self) -> str:
        """The call's id (interceptors/request_id.py), decided on first use."""
        if self._request_id is None:
            self._request_id = resolve_request_id(self.header_request_id, self.usage.request_id)
        return self._request_id

    def billable(self) -> bool:
        """Whether this call belongs in the ledger (interceptors/billing_policy.py)."""
        return is_billable(self.usage)

    def response_metadata(self) -> list[tuple[str, str]]:
        """``x-request-id`` and the billed token counts, for trailers / response headers
        (interceptors/response_meta.py)."""
        return usage_metadata(self)

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
        """End the call: write the ledger record, judge the ledger's answer, then the
        span and metrics.

        ``ok``/``status`` are the transport outcome ("OK"/gRPC code name, HTTP status);
        a frontend's ``usage.app_status`` turns a transport success into an error.
        Returns the record written (None for non-billable calls and replays; a replay
        sets :attr:`replay`). Raises ServingError when the call must not be answered as
        the handler did: ``unavailable`` (LEDGER_FAILURE_MESSAGE) when the record could
        not be made durable, ``already_exists`` when the request id is refused
        (interceptors/billing_policy.py). The transport must then replace the response.
        Idempotent: a second call returns the first result.
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
        refusal: ServingError | None = None
        if self.auth_pending is not None and self.auth_refusal is None and call_ok:
            # Fail closed: a frontend answered without presenting the body's key.
            refusal = ServingError("unauthenticated", MISSING_KEY_MESSAGE, reason="missing_key")
            core.auth_refused(refusal, self.protocol, span=self.span)
            final_status, key, value = refusal_status(self.protocol, refusal.kind)
            attrs[key] = value
            call_ok, error_message = False, refusal.message
        elif self.auth_pending is None and self.limit_refusal is None and self.billable():
            try:
                record = build_record(
                    self,
                    status=final_status,
                    ok=call_ok,
                    duration_s=duration_s,
                    request_bytes=request_bytes,
                    response_bytes=response_bytes,
                    record_content=core.record_content,
                )
                price_record(record, core.pricebook, core.count_error)
                outcome = None if core.ledger is None else await core.ledger.submit(record)
            except Exception as exc:  # not built or not durable: the call must fail
                core.count_error("ledger", exc, self.request_id)
                refusal = ServingError("unavailable", LEDGER_FAILURE_MESSAGE)
                refusal.__cause__ = exc
            else:
                settlement = settle(record, outcome, core.max_replays)
                refusal = settlement.refusal
                if settlement.replay is not None:
                    self.replay = settlement.replay
                elif refusal is None:
                    self.record = record
            if refusal is not None:
                final_status, key, value = refusal_status(self.protocol, refusal.kind)
                attrs[key] = value
                call_ok, error_message = False, refusal.message
            elif self.record is not None:  # Triton's statistics: what the ledger holds
                try:
                    core.model_stats.observe(
                        self.record.model,
                        self.record.model_version,
                        ok=call_ok,
                        duration_ns=int(duration_s * 1e9),
                        clock=self.clock,
                    )
                except Exception as exc:
                    core.count_error("model_stats", exc, self.request_id)
        if self.reservation is not None:
            await self._settle_reservation()
        try:
            emit(
                self,
                ok=call_ok,
                status=final_status,
                error_message=error_message,
                duration_s=duration_s,
                request_bytes=request_bytes,
                response_bytes=response_bytes,
                transport_attrs=attrs,
            )
        except Exception as exc:
            core.count_error("emit", exc, self.request_id)
        finally:
            self.span.end()
        self.ok = call_ok
        if refusal is not None:
            raise refusal
        return self.record

    async def _settle_reservation(self) -> None:
        """Budgets move from the reservation to what was billed now (nothing for a
        failure, a refusal or a replay); a soft-limit crossing becomes a span event."""
        core, reservation = self.core, self.reservation
        self.reservation = None
        assert core.guard is not None and reservation is not None
        crossings = await core.guard.settle(reservation, self.record)
        for crossing in crossings:
            try:
                self.span.add_event(
                    sc.EVENT_BUDGET_SOFT_LIMIT, crossing.attributes(core.guard.currency)
                )
            except Exception as exc:
                core.count_error("budget_event", exc, self.request_id)
