"""The ledger's health as metrics: spool backlog, records lost, commit latency.

Registered by :class:`interceptors.core.MeteringCore` when its ledger implements
:class:`exporters.ledger.base.ReportsHealth` (the SQLite, PostgreSQL and JSONL writers).
The gauge and the counter are observed at collection time from ``ledger.health()`` (a
snapshot without I/O), so they cost requests nothing; commit latency is recorded by the
ledger's writer thread through ``ledger.add_commit_listener`` where the ledger offers it.
SDK instruments in both telemetry modes (none of these is on a request's path).
On Prometheus: ``paddle_meter_ledger_spool_pending``,
``paddle_meter_ledger_write_failures_total``, ``paddle_meter_ledger_commit_duration_seconds``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from exporters import semconv as sc
from exporters.ledger.base import ReportsHealth

__all__ = ["LedgerMetrics"]

log = logging.getLogger(__name__)


class LedgerMetrics:
    """Observes ``ledger`` on ``meter`` until :meth:`close` (then reports nothing more)."""

    def __init__(self, meter: Meter, ledger: ReportsHealth) -> None:
        self._ledger = ledger
        self._open = True
        meter.create_observable_gauge(
            sc.METRIC_LEDGER_SPOOL_PENDING,
            callbacks=[self._spool_pending],
            unit="{record}",
            description="Usage records durable in the local spool, not yet in the database",
        )
        meter.create_observable_counter(
            sc.METRIC_LEDGER_WRITE_FAILURES,
            callbacks=[self._write_failures],
            unit="{record}",
            description="Usage records that could be made durable nowhere (their calls failed)",
        )
        self._commit_duration = meter.create_histogram(
            sc.METRIC_LEDGER_COMMIT_DURATION,
            unit="s",
            description="Duration of one ledger commit (a batch of records)",
            explicit_bucket_boundaries_advisory=sc.LEDGER_COMMIT_BUCKETS,
        )
        add_listener = getattr(ledger, "add_commit_listener", None)
        if add_listener is not None:
            add_listener(self._committed)

    def close(self) -> None:
        """Stop reporting (the ledger keeps the listener; it becomes a no-op)."""
        self._open = False

    def _committed(self, seconds: float, records: int) -> None:
        # On the ledger's writer thread, after each commit: must stay quick.
        if self._open:
            self._commit_duration.record(seconds)

    def _observe(self, field: str) -> Iterable[Observation]:
        if not self._open:
            return ()
        try:
            value: Any = getattr(self._ledger.health(), field)
        except Exception as exc:  # a broken health() must not break the whole collection
            log.warning("ledger health unreadable: %s", type(exc).__name__,
                        extra={"error_type": type(exc).__name__})
            return ()
        return (Observation(value),)

    def _spool_pending(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe("spool_pending")

    def _write_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe("write_failures")
