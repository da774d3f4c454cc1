"""The built-in anomaly detector, for sites without Prometheus (branch offices).

Every ``anomalies.interval_s`` (60 s) each serving process evaluates, over the ledger
(the last ``window_s`` of records against the trailing ``baseline_s`` of minute rollups):

- ``token_surge``: a tenant's billable tokens in the window above ``surge_factor`` x its own
  trailing average per window (and at least ``min_surge_tokens``);
- ``overlong_inputs``: at least ``overlong_count`` calls of a tenant in the window whose
  input was truncated, or had at least ``overlong_tokens`` input tokens or
  ``overlong_characters`` characters;
- ``error_burst``: a tenant's failed calls in the window at least ``error_ratio`` of its
  calls (and at least ``min_errors``);
- ``spool_backlog``: at least ``spool_records`` usage records waiting in this node's spool.

An anomaly is raised once per (rule, tenant) per ``cooldown_s``, across every worker and
replica: the check and the insert of its row in the ledger database's ``anomalies`` table
(schema v7) are one transaction (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock).
The process that inserted it then logs it (WARNING, ``event: paddle_meter.anomaly``), adds
an OTel span ``paddle_meter.anomaly`` with the event, and POSTs it to every configured
webhook in its format (``generic`` JSON, ``slack``, ``dingtalk``, ``wecom``), retrying with
backoff (``webhook_retries``). The dashboard shows the recent rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import threading
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, Final

from exporters.ledger.dsn import redact_dsn
from exporters.ledger.reader import LedgerReader
from exporters.ledger.schema import normalize_ts

__all__ = [
    "WEBHOOK_FORMATS",
    "Anomaly",
    "AnomalyDetector",
    "detector_from_config",
    "parse_settings",
    "recent_anomalies",
    "webhook_body",
]

log = logging.getLogger(__name__)

WEBHOOK_FORMATS: Final = ("generic", "slack", "dingtalk", "wecom")
EVENT_ANOMALY: Final = "paddle_meter.anomaly"
_DEFAULTS: Final[dict[str, Any]] = {
    "enabled": True, "interval_s": 60.0, "window_s": 60.0, "baseline_s": 3600.0,
    "surge_factor": 3.0, "min_surge_tokens": 1000, "overlong_count": 20,
    "overlong_tokens": 512, "overlong_characters": 5000, "error_ratio": 0.5, "min_errors": 10,
    "spool_records": 1000, "cooldown_s": 900.0, "webhook_retries": 3, "webhook_timeout_s": 5.0,
    "webhooks": [],
}
_LOCK_KEY: Final = 727002


@dataclasses.dataclass(frozen=True)
class Anomaly:
    rule: str
    tenant: str
    value: float
    threshold: float
    summary: str
    details: dict[str, Any]
    detected_at: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def webhook_body(anomaly: Anomaly, fmt: str) -> dict[str, Any]:
    """The POST body of ``anomaly`` in a webhook format: ``generic`` (the anomaly as JSON),
    ``slack`` (incoming webhook ``text``), ``dingtalk`` and ``wecom`` (robot ``markdown``)."""
    title = f"[paddle-meter] {anomaly.rule}: tenant {anomaly.tenant}"
    text = f"{anomaly.summary} (value {anomaly.value:g}, threshold {anomaly.threshold:g}, " \
           f"at {anomaly.detected_at})"
    if fmt == "generic":
        return {"source": "paddle-meter", **anomaly.as_dict()}
    if fmt == "slack":
        return {"text": f"*{title}*\n{text}"}
    if fmt == "dingtalk":
        return {"msgtype": "markdown", "markdown": {"title": title, "text": f"### {title}\n{text}"}}
    if fmt == "wecom":
        return {"msgtype": "markdown", "markdown": {"content": f"**{title}**\n{text}"}}
    raise ValueError(f"unknown webhook format {fmt!r}; use one of {', '.join(WEBHOOK_FORMATS)}")


def parse_settings(block: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``anomalies`` config block over the defaults; ValueError naming a bad field."""
    values = dict(_DEFAULTS)
    for key, value in dict(block or {}).items():
        if key not in _DEFAULTS:
            raise ValueError(f"unknown anomalies option {key!r}; known: {sorted(_DEFAULTS)}")
        values[key] = value
    for key, default in _DEFAULTS.items():
        value = values[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"anomalies.{key}: true or false, not {value!r}")
        elif isinstance(default, int | float) and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise ValueError(f"anomalies.{key}: a number >= 0, not {value!r}")
    hooks = values["webhooks"]
    if not isinstance(hooks, list):
        raise ValueError("anomalies.webhooks: a list of {url, format}")
    for i, hook in enumerate(hooks):
        if not isinstance(hook, Mapping) or not str(hook.get("url", "")).startswith(
                ("http://", "https://")) or set(hook) - {"url", "format"}:
            raise ValueError(f"anomalies.webhooks[{i}]: {{url: http(s)://..., format: ...}}")
        if hook.get("format", "generic") not in WEBHOOK_FORMATS:
            raise ValueError(f"anomalies.webhooks[{i}].format: one of {', '.join(WEBHOOK_FORMATS)}")
    return values


def recent_anomalies(reader: LedgerReader, *, limit: int = 20,
                     tenant: str | None = None) -> list[dict[str, Any]]:
    """The newest anomalies (for the dashboard), newest first."""
    where, params = ("", ()) if tenant is None else (" WHERE tenant = ?", (tenant,))
    rows = reader.fetch_all(
        f"SELECT rule, tenant, detected_at, value, threshold, summary FROM anomalies{where} "
        f"ORDER BY detected_at DESC LIMIT {int(limit)}", params)
    return [{"rule": r, "tenant": t, "detected_at": at, "value": float(v),
             "threshold": float(th), "summary": s} for r, t, at, v, th, s in rows]


class AnomalyDetector:
    """Evaluates the rules on a thread every ``interval_s``; see the module docstring."""

    def __init__(self, ledger_url: str, settings: Mapping[str, Any], *,
                 spool_pending: Callable[[], int] = lambda: 0,
                 on_anomaly: Callable[[Anomaly], None] | None = None) -> None:
        self.settings = dict(settings)
        self._reader = LedgerReader(ledger_url)
        self._spool_pending = spool_pending
        self._on_anomaly = on_anomaly
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"AnomalyDetector({redact_dsn(self._reader.target)!r})"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="anomaly-detector", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(float(self.settings["interval_s"])):
            try:
                self.evaluate()
            except Exception as exc:  # the ledger may be down: try again next round
                log.warning("anomaly evaluation failed: %s", type(exc).__name__,
                            extra={"error_type": type(exc).__name__})

    # -- rules ------------------------------------------------------------------------

    def candidates(self, now: _dt.datetime | None = None) -> list[Anomaly]:
        """Every rule's findings now (before the cooldown); blocks on the database."""
        cfg = self.settings
        now = now or _dt.datetime.now(_dt.timezone.utc)
        window = float(cfg["window_s"])
        since = normalize_ts(now - _dt.timedelta(seconds=window))
        found: list[Anomaly] = []
        rows = self._reader.fetch_all(
            "SELECT tenant, COUNT(*), SUM(CASE WHEN status = 'ok' THEN 0 ELSE 1 END), "
            "COALESCE(SUM(CASE WHEN status = 'ok' THEN billable_tokens ELSE 0 END), 0), "
            "SUM(CASE WHEN truncated = 1 OR input_tokens >= ? OR characters >= ? THEN 1 "
            "ELSE 0 END) FROM usage_records WHERE ts >= ? GROUP BY tenant",
            (int(cfg["overlong_tokens"]), int(cfg["overlong_characters"]), since))
        base_lo = (now - _dt.timedelta(seconds=window + float(cfg["baseline_s"])))
        base_hi = now - _dt.timedelta(seconds=window)
        baseline = dict(self._reader.fetch_all(
            "SELECT tenant, COALESCE(SUM(billable_tokens), 0) FROM usage_rollup_minute "
            "WHERE minute >= ? AND minute < ? AND status_class = 'ok' GROUP BY tenant",
            (base_lo.strftime("%Y-%m-%dT%H:%M"), base_hi.strftime("%Y-%m-%dT%H:%M"))))
        windows = float(cfg["baseline_s"]) / window
        for tenant, calls, errors, tokens, overlong in rows:
            calls, errors, tokens, overlong = (int(calls), int(errors or 0), int(tokens),
                                               int(overlong or 0))
            usual = int(baseline.get(tenant, 0) or 0) / windows
            limit = max(float(cfg["surge_factor"]) * usual, float(cfg["min_surge_tokens"]))
            if tokens > limit:
                found.append(Anomaly(
                    "token_surge", tenant, tokens, limit,
                    f"tenant {tenant} billed {tokens:,} tokens in {window:g} s, over "
                    f"{cfg['surge_factor']:g}x its usual {usual:,.0f} per {window:g} s",
                    {"window_s": window, "baseline_tokens_per_window": usual}))
            if overlong >= int(cfg["overlong_count"]) > 0:
                found.append(Anomaly(
                    "overlong_inputs", tenant, overlong, int(cfg["overlong_count"]),
                    f"tenant {tenant} sent {overlong} over-long inputs in {window:g} s "
                    f"(truncated, or >= {cfg['overlong_tokens']} tokens / "
                    f">= {cfg['overlong_characters']} characters)", {"window_s": window}))
            if errors >= int(cfg["min_errors"]) and errors >= float(cfg["error_ratio"]) * calls:
                found.append(Anomaly(
                    "error_burst", tenant, errors, float(cfg["error_ratio"]) * calls,
                    f"{errors} of tenant {tenant}'s {calls} calls failed in {window:g} s",
                    {"window_s": window, "calls": calls}))
        pending = int(self._spool_pending())
        if pending >= int(cfg["spool_records"]) > 0:
            found.append(Anomaly(
                "spool_backlog", "*", pending, int(cfg["spool_records"]),
                f"{pending} usage records wait in the local spool: the ledger database "
                "refuses writes", {}))
        return found

    def evaluate(self, now: _dt.datetime | None = None) -> list[Anomaly]:
        """Raise what the rules find, each (rule, tenant) once per cooldown; returns what
        this process raised (and delivered)."""
        now = now or _dt.datetime.now(_dt.timezone.utc)
        raised = []
        for anomaly in self.candidates(now):
            stamped = dataclasses.replace(anomaly, detected_at=normalize_ts(now))
            if self._claim(stamped, now):
                raised.append(stamped)
                self._announce(stamped)
        return raised

    def _claim(self, anomaly: Anomaly, now: _dt.datetime) -> bool:
        """Insert the anomaly unless one of its (rule, tenant) is within the cooldown; one
        transaction, serialised across processes."""
        sql = self._reader.sql
        cutoff = normalize_ts(now - _dt.timedelta(seconds=float(self.settings["cooldown_s"])))
        with self._reader.transaction() as cur:
            if self._reader.dialect == "postgresql":
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            cur.execute(sql("SELECT 1 FROM anomalies WHERE rule = ? AND tenant = ? "
                            "AND detected_at > ? LIMIT 1"), (anomaly.rule, anomaly.tenant, cutoff))
            if cur.fetchone() is not None:
                return False
            cur.execute(sql("INSERT INTO anomalies (rule, tenant, detected_at, value, threshold, "
                            "summary, details) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                        (anomaly.rule, anomaly.tenant, anomaly.detected_at, anomaly.value,
                         anomaly.threshold, anomaly.summary, json.dumps(anomaly.details)))
        return True

    def _announce(self, anomaly: Anomaly) -> None:
        log.warning("anomaly: %s", anomaly.summary,
                    extra={"event": EVENT_ANOMALY, "rule": anomaly.rule, "tenant": anomaly.tenant,
                           "value": anomaly.value, "threshold": anomaly.threshold})
        if self._on_anomaly is not None:
            with contextlib.suppress(Exception):
                self._on_anomaly(anomaly)
        delivered = [self._deliver(hook, anomaly) for hook in self.settings["webhooks"]]
        with contextlib.suppress(Exception), self._reader.transaction() as cur:
            cur.execute(self._reader.sql(
                "UPDATE anomalies SET delivered = ? WHERE rule = ? AND tenant = ? AND "
                "detected_at = ?"), (json.dumps(delivered), anomaly.rule, anomaly.tenant,
                                     anomaly.detected_at))

    def _deliver(self, hook: Mapping[str, Any], anomaly: Anomaly) -> bool:
        """POST to one webhook, retrying with backoff (1 s, 2 s, 4 s ...); never raises.
        The URL is not logged (robot URLs carry their access token)."""
        fmt = hook.get("format", "generic")
        body = json.dumps(webhook_body(anomaly, fmt), ensure_ascii=False).encode("utf-8")
        attempts = int(self.settings["webhook_retries"]) + 1
        for attempt in range(attempts):
            request = urllib.request.Request(str(hook["url"]), data=body, method="POST",
                                             headers={"content-type": "application/json"})
            try:
                timeout = float(self.settings["webhook_timeout_s"])
                with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
                    if 200 <= reply.status < 300:
                        return True
            except Exception as exc:
                log.warning("anomaly webhook (%s) failed, attempt %d of %d: %s", fmt,
                            attempt + 1, attempts, type(exc).__name__,
                            extra={"format": fmt, "error_type": type(exc).__name__})
            if attempt + 1 < attempts and self._stop.wait(min(2.0**attempt, 30.0)):
                break
        return False


def detector_from_config(config: Mapping[str, Any], ledger_url: str, **kwargs: Any
                         ) -> AnomalyDetector | None:
    """From the ``anomalies`` block; None when disabled or the ledger is JSONL."""
    settings = parse_settings(config.get("anomalies"))
    if not settings["enabled"] or ledger_url.startswith("jsonl://"):
        return None
    return AnomalyDetector(ledger_url, settings, **kwargs)
