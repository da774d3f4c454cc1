"""Local durable spool: where records go when the ledger database cannot take them.

Policy (see exporters/ledger/__init__.py): a batch the database refused is appended here
(JSONL, fsync'd, file mode 0600, directory 0700) and its submitters are told it is
durable; the group-commit thread later replays the spool into the database. Replays are
idempotent because the database ignores a request_id it already has.

Each process owns one spool file and holds an exclusive ``flock`` on it while alive, so
another process may replay (and delete) only the spool files of processes that are gone.
Only the owning writer thread touches its own file, so no in-process locking is needed.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from exporters.ledger.schema import record_to_row
from exporters.usage_record import LEDGER_COLUMNS, UsageRecord

_N = len(LEDGER_COLUMNS)
_TRUNCATED = LEDGER_COLUMNS.index("truncated")

__all__ = ["Spool"]


def ensure_private_dir(path: str) -> None:
    """Create ``path`` (and parents) mode 0700 if missing."""
    os.makedirs(path, mode=0o700, exist_ok=True)


class Spool:
    """One process's spool file in ``directory``; created lazily on the first append."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, f"spool-{os.getpid()}-{uuid.uuid4().hex}.jsonl")
        self._fd: int | None = None
        self.pending = 0  # records appended here and not yet replayed

    def append(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Durably append ledger rows (write + fsync). Raises OSError when that fails.

        ``rows`` are :func:`~exporters.ledger.schema.record_to_row` tuples; each line is
        the record's ledger fields as a JSON object (what :meth:`read_own` reads back).
        """
        if self._fd is None:
            ensure_private_dir(self.directory)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fd = fd
        data = "".join(
            json.dumps(dict(zip(LEDGER_COLUMNS, row[:_N], strict=True)) | {
                "truncated": bool(row[_TRUNCATED])}, separators=(",", ":")) + "\n"
            for row in rows)
        payload = data.encode()
        written = 0
        while written < len(payload):
            written += os.write(self._fd, payload[written:])
        os.fsync(self._fd)
        self.pending += len(rows)

    def read_own(self) -> list[tuple[Any, ...]]:
        """Everything in this process's spool file, as ledger rows."""
        return list(_read(self.path)) if self.pending else []

    def clear_own(self) -> None:
        """Empty this process's spool after its records were committed."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
        self.pending = 0

    def orphans(self) -> Iterator[tuple[str, int]]:
        """Spool files of dead processes, each yielded locked as (path, fd); caller closes."""
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if path == self.path or not name.endswith(".jsonl"):
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its owner is alive
                os.close(fd)
                continue
            yield path, fd

    @staticmethod
    def read_path(path: str) -> list[tuple[Any, ...]]:
        return list(_read(path))

    def close(self) -> None:
        """Close (and delete when empty) this process's spool file."""
        if self._fd is not None:
            if self.pending == 0:
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


def _read(path: str) -> Iterator[tuple[Any, ...]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            # A torn last line (crash mid-write) was never acknowledged: skip it.
            if not line:
                continue
            try:
                yield record_to_row(UsageRecord(**json.loads(line)))
            except (ValueError, TypeError):
                continue
