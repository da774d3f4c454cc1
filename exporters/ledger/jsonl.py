"""JSONL ledger writer: the simple per-call log, one ``to_jsonl_dict()`` line per request.

Lines carry the ledger fields plus the seed-compatible ``timestamp``/``image``/
``token_count`` (and ``content`` when recorded), so ``pd.read_json(path, lines=True)``
scripts work on it. Each group of records is appended with one write and one fsync.
Exactly once, with the SQL ledgers' billing key (exporters/ledger/schema.py): one ok
record per (tenant, request_id), each failed attempt keyed by its span id (its ``ts`` as
written when it has none); keys already in the file are skipped, and a skipped ok record
is told the billed one's figures (read back from the file by offset). Several processes
may append to one file: each append holds an exclusive ``flock`` and first reads what
other processes appended since this one last looked, so their keys are known too.
Replay counts live in this process's memory only (the file keeps one line per request).
There is no spool: the file is already the local durable copy, so a failed append
raises LedgerWriteError to the submitter.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Sequence
from typing import Any

from exporters.ledger.base import BilledRecord, WriteOutcome
from exporters.ledger.outcomes import EntryView, TenantRequest, resolve_outcomes
from exporters.ledger.sink import GroupCommitSink
from exporters.ledger.spool import ensure_private_dir
from exporters.usage_record import UsageRecord

__all__ = ["JsonlLedger"]


def _key(fields: Any) -> tuple[str, str, str]:
    """Billing key of a record or of a parsed line (a dict): see the module docstring."""
    get = fields.get if isinstance(fields, dict) else fields.__getattribute__
    if get("status") == "ok":
        return (get("tenant"), get("request_id"), "")
    return (get("tenant"), get("request_id"), get("span_id") or get("ts"))


def _billed(fields: Any) -> BilledRecord:
    get = fields.get if isinstance(fields, dict) else fields.__getattribute__
    return BilledRecord(
        get("content_sha256"),
        int(get("input_tokens") or 0),
        int(get("output_tokens") or 0),
        int(get("billable_tokens") or 0),
        get("price_id"),
        get("cost"),
    )


class JsonlLedger(GroupCommitSink):
    """Append-only JSONL writer with per-group fsync."""

    def __init__(self, path: str, *, max_batch: int = 10_000, max_pending: int = 100_000) -> None:
        self.path = os.path.abspath(path)
        self.url = f"jsonl://{self.path}"
        ensure_private_dir(os.path.dirname(self.path))
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._seen: set[tuple[str, str, str]] = set()
        self._ok_at: dict[TenantRequest, tuple[int, int]] = {}  # (offset, length) of ok lines
        self._replays: dict[TenantRequest, int] = {}
        self._offset = 0
        self._start(
            name="ledger-jsonl",
            spool_dir=None,
            max_batch=max_batch,
            retry_interval_s=1.0,
            max_pending=max_pending,
        )

    # The JSONL writer stores records (their to_jsonl_dict lines), not SQL rows.
    _view = EntryView(key=_key, billed=_billed)

    def _prepare(self, record: UsageRecord) -> UsageRecord:
        super()._prepare(record)  # validates (type, request_id, ts, cost)
        return record

    def write_rows(self, rows: Sequence[tuple]) -> list:
        raise TypeError("the JSONL ledger takes UsageRecords: use write_batch")

    def _catch_up(self) -> None:
        """Learn the billing keys appended (by anyone) after ``self._offset``."""
        end = os.fstat(self._fd).st_size
        if end <= self._offset:
            return
        data = os.pread(self._fd, end - self._offset, self._offset)
        complete = data.rfind(b"\n") + 1  # ignore a torn last line
        pos = 0
        while pos < complete:
            nl = data.index(b"\n", pos)
            # a line that is not a record (hand-edited, foreign) keys nothing
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                self._learn(json.loads(data[pos:nl]), self._offset + pos, nl - pos)
            pos = nl + 1
        self._offset += complete

    def _learn(self, fields: Any, offset: int, length: int) -> None:
        key = _key(fields)
        if not isinstance(key[1], str):
            raise TypeError("no request_id")
        self._seen.add(key)
        if key[2] == "":
            self._ok_at.setdefault(key[:2], (offset, length))

    def _fetch_billed(self, keys: list[TenantRequest]) -> dict[TenantRequest, BilledRecord]:
        found = {}
        for key in keys:
            at = self._ok_at.get(key)
            if at is not None:
                found[key] = _billed(json.loads(os.pread(self._fd, at[1], at[0])))
        return found

    def _add_replays(self, bumps: dict[TenantRequest, int]) -> dict[TenantRequest, int]:
        for key, n in bumps.items():
            self._replays[key] = self._replays.get(key, 0) + n
        return {key: self._replays[key] for key in bumps}

    def _commit(
        self, records: Sequence[UsageRecord], repeats: Sequence[UsageRecord], count_replays: bool
    ) -> list[WriteOutcome]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._catch_up()
            seen = self._seen
            keys = [_key(r) for r in records]
            flags = [k not in seen for k in keys]
            lines = [
                json.dumps(r.to_jsonl_dict(), ensure_ascii=False, separators=(",", ":")).encode()
                + b"\n"
                for r, new in zip(records, flags, strict=True)
                if new
            ]
            payload = b"".join(lines)
            if payload:
                try:
                    written = 0
                    while written < len(payload):
                        written += os.write(self._fd, payload[written:])
                    os.fsync(self._fd)
                except OSError:
                    # Drop the partial group so the next append starts on a clean line.
                    os.ftruncate(self._fd, self._offset)
                    raise
            offset = self._offset
            self._offset += len(payload)
            new_lines = iter(lines)
            for key, new in zip(keys, flags, strict=True):
                if new:
                    line = next(new_lines)
                    seen.add(key)
                    if key[2] == "":
                        self._ok_at[key[:2]] = (offset, len(line) - 1)
                    offset += len(line)
            return resolve_outcomes(
                records,
                flags,
                repeats,
                self._view,
                fetch_existing=self._fetch_billed,
                add_replays=self._add_replays if count_replays else None,
            )
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _close(self) -> None:
        os.close(self._fd)
