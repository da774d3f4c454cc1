"""JSONL ledger writer: the simple per-call log, one ``to_jsonl_dict()`` line per request.

Lines carry the ledger fields plus the seed-compatible ``timestamp``/``image``/
``token_count`` (and ``content`` when recorded), so ``pd.read_json(path, lines=True)``
scripts work on it. Each group of records is appended with one write and one fsync.
Exactly once: request_ids already in the file are skipped. Several processes may append
to one file: each append holds an exclusive ``flock`` and first reads what other
processes appended since this one last looked, so their request_ids are known too.
There is no spool: the file is already the local durable copy, so a failed append
raises LedgerWriteError to the submitter.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Sequence
from operator import attrgetter

from exporters.ledger.sink import GroupCommitSink
from exporters.ledger.spool import ensure_private_dir
from exporters.usage_record import UsageRecord

__all__ = ["JsonlLedger"]


class JsonlLedger(GroupCommitSink):
    """Append-only JSONL writer with per-group fsync."""

    def __init__(self, path: str, *, max_batch: int = 10_000) -> None:
        self.path = os.path.abspath(path)
        self.url = f"jsonl://{self.path}"
        ensure_private_dir(os.path.dirname(self.path))
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._seen: set[str] = set()
        self._offset = 0
        self._start(name="ledger-jsonl", spool_dir=None, max_batch=max_batch, retry_interval_s=1.0)

    # The JSONL writer stores records (their to_jsonl_dict lines), not SQL rows.
    _entry_key = staticmethod(attrgetter("request_id"))

    def _prepare(self, record: UsageRecord) -> UsageRecord:
        super()._prepare(record)  # validates (type, request_id, ts, cost)
        return record

    def write_rows(self, rows: Sequence[tuple]) -> list:
        raise TypeError("the JSONL ledger takes UsageRecords: use write_batch")

    def _catch_up(self) -> None:
        """Learn request_ids appended (by anyone) after ``self._offset``."""
        end = os.fstat(self._fd).st_size
        if end <= self._offset:
            return
        data = os.pread(self._fd, end - self._offset, self._offset)
        complete = data.rfind(b"\n") + 1  # ignore a torn last line
        for line in data[:complete].splitlines():
            try:
                self._seen.add(json.loads(line)["request_id"])
            except (ValueError, KeyError, TypeError):
                continue
        self._offset += complete

    def _commit(self, records: Sequence[UsageRecord]) -> list[bool]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._catch_up()
            flags = [r.request_id not in self._seen for r in records]
            payload = "".join(
                json.dumps(r.to_jsonl_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"
                for r, new in zip(records, flags, strict=True)
                if new
            ).encode()
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
                self._offset += len(payload)
            self._seen.update(r.request_id for r, new in zip(records, flags, strict=True) if new)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return flags

    def _close(self) -> None:
        os.close(self._fd)
