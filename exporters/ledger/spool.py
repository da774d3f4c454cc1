"""Local durable spool: where records go when the ledger database cannot take them.

Policy (see exporters/ledger/__init__.py): a batch the database refused is appended here
(JSONL, fsync'd, file mode 0600, directory 0700) and its submitters are told it is
durable; the group-commit thread later replays the spool into the database. Replays are
idempotent because the database ignores a request_id it already has.

One spool directory per data dir (``<data_dir>/ledger.spool``), whatever the ledger kind,
so a dead process's records are replayed by the next process of that deployment even if
it writes to another database. Each process owns one file ``spool-<pid>-<uuid>.jsonl``
and holds an exclusive ``flock`` on it while alive (taken before the file gets its
public name, so nobody can see it unlocked); another process replays (and deletes) only
the files of processes that are gone. Only the owning writer thread touches its own file.

Never losing a line: a file is removed or emptied only after every record in it was
committed to the database and every unreadable line was copied to the quarantine file.
"Torn" means exactly one thing: the last line of a file, not ended by a newline (a crash
between write and fsync; that record was never acknowledged, so it is dropped with a
warning). Any other line that does not parse as a usage record is *malformed*: it goes,
with its origin, to ``quarantine.jsonl`` (0600) in the spool dir, is counted and logged
at ERROR, and is never replayed automatically. A spooled ok record whose (tenant,
request_id) turns out, at replay, to be billed already for another payload goes to
``conflicts.jsonl`` (0600) the same way (see exporters/ledger/replay.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from exporters.ledger.base import BilledRecord
from exporters.ledger.schema import record_to_row
from exporters.usage_record import LEDGER_COLUMNS, UsageRecord

_N = len(LEDGER_COLUMNS)
_TRUNCATED = LEDGER_COLUMNS.index("truncated")
QUARANTINE_NAME = "quarantine.jsonl"
CONFLICTS_NAME = "conflicts.jsonl"
SPOOL_DIR_NAME = "ledger.spool"

__all__ = [
    "CONFLICTS_NAME",
    "QUARANTINE_NAME",
    "SPOOL_DIR_NAME",
    "Spool",
    "SpoolContents",
    "default_spool_dir",
]


def ensure_private_dir(path: str) -> None:
    """Create ``path`` (and parents) mode 0700 if missing."""
    os.makedirs(path, mode=0o700, exist_ok=True)


def default_spool_dir(sqlite_path: str | None = None) -> str:
    """The spool dir when the caller names none: ``$PADDLE_METER_DATA_DIR/ledger.spool``.

    Without that variable: next to a SQLite ledger file (its directory is the data dir in
    the default layout), else ``~/.paddle-meter/ledger.spool``. A server passes its data
    dir's spool explicitly, so these defaults only serve tools and tests.
    """
    base = os.environ.get("PADDLE_METER_DATA_DIR")
    if not base:
        base = (
            os.path.dirname(os.path.abspath(sqlite_path))
            if sqlite_path
            else os.path.expanduser("~/.paddle-meter")
        )
    return os.path.join(base, SPOOL_DIR_NAME)


@dataclasses.dataclass
class SpoolContents:
    """What a spool file holds: rows to replay, malformed lines, and whether it was torn."""

    rows: list[tuple[Any, ...]]
    bad: list[tuple[int, bytes, str]]  # (line number, raw bytes, why)
    torn: bytes | None  # the unterminated last line, dropped


class Spool:
    """One process's spool file in ``directory``; created lazily on the first append."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.name = f"spool-{os.getpid()}-{uuid.uuid4().hex}.jsonl"
        self.path = os.path.join(self.directory, self.name)
        self._fd: int | None = None
        self._size = 0  # bytes of whole, fsync'd lines in our file
        self.pending = 0  # records appended here and not yet replayed

    def append(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Durably append ledger rows (write + fsync). Raises OSError when that fails.

        ``rows`` are :func:`~exporters.ledger.schema.record_to_row` tuples; each line is
        the record's ledger fields as a JSON object. A failed append is cut back off the
        file, so a later append never glues a record onto a partial line.
        """
        fd = self._open()
        payload = "".join(
            json.dumps(_row_fields(row), separators=(",", ":")) + "\n" for row in rows
        ).encode()
        try:
            written = 0
            while written < len(payload):
                written += os.write(fd, payload[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, self._size)  # raises too if the file is unusable
            raise
        self._size += len(payload)
        self.pending += len(rows)

    def probe(self) -> None:
        """Check that the spool can take a write (open, 1 byte, fsync, cut). Raises OSError."""
        fd = self._open()
        try:
            os.write(fd, b"\n")
            os.fsync(fd)
        finally:
            os.ftruncate(fd, self._size)

    def _open(self) -> int:
        if self._fd is None:
            ensure_private_dir(self.directory)
            # Lock under a private name, then publish: an orphan scan must never find
            # (and delete) our file in the instant between create and flock.
            hidden = os.path.join(self.directory, f".{self.name}.new")
            fd = os.open(hidden, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(hidden, self.path)
            except OSError:
                os.close(fd)
                _unlink_quietly(hidden)
                raise
            self._fd = fd
            self._size = 0
        return self._fd

    def read_own(self) -> SpoolContents:
        """Everything in this process's spool file."""
        if not self.pending:
            return SpoolContents([], [], None)
        return read_spool_file(self.path)

    def clear_own(self) -> None:
        """Empty this process's spool; call only after its records were committed."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
        self._size = 0
        self.pending = 0

    def orphans(self) -> Iterator[tuple[str, int]]:
        """Spool files of dead processes, each yielded locked as (path, fd); caller closes."""
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if not (name.startswith("spool-") and name.endswith(".jsonl")) or name == self.name:
                continue
            path = os.path.join(self.directory, name)
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its owner is alive, or another process is replaying it
                os.close(fd)
                continue
            if os.fstat(fd).st_nlink == 0:  # replayed and removed while we waited
                os.close(fd)
                continue
            yield path, fd

    def quarantine(self, source: str, bad: Sequence[tuple[int, bytes, str]]) -> None:
        """Append malformed lines, with their origin, to the quarantine file (fsync'd).

        Raises OSError; the caller then keeps the source file so nothing is lost.
        """
        if not bad:
            return
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._append_private(
            QUARANTINE_NAME,
            (
                {
                    "quarantined_at": now,
                    "source": os.path.basename(source),
                    "line": lineno,
                    "error": why,
                    "raw": raw.decode("utf-8", errors="backslashreplace"),
                }
                for lineno, raw, why in bad
            ),
        )

    def record_conflicts(
        self, source: str, conflicts: Sequence[tuple[tuple[Any, ...], BilledRecord]]
    ) -> None:
        """Append spooled records refused at replay (their (tenant, request_id) is billed
        with another payload), with the billed figures, to the conflicts file (fsync'd).

        Raises OSError; the caller then keeps the source file so nothing is lost.
        """
        if not conflicts:
            return
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._append_private(
            CONFLICTS_NAME,
            (
                {
                    "conflict_at": now,
                    "source": os.path.basename(source),
                    "reason": "(tenant, request_id) already billed for another content_sha256",
                    "record": _row_fields(row),
                    "billed": dataclasses.asdict(billed),
                }
                for row, billed in conflicts
            ),
        )

    def _append_private(self, name: str, objects: Iterable[dict[str, Any]]) -> None:
        """Append JSON lines to ``name`` in the spool dir (0600, flock'd, fsync'd)."""
        ensure_private_dir(self.directory)
        payload = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects).encode()
        fd = os.open(
            os.path.join(self.directory, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # several processes may append at once
            written = 0
            while written < len(payload):
                written += os.write(fd, payload[written:])
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close (and delete when empty) this process's spool file."""
        if self._fd is not None:
            if self.pending == 0:
                _unlink_quietly(self.path)
            os.close(self._fd)
            self._fd = None


def _row_fields(row: Sequence[Any]) -> dict[str, Any]:
    """A ledger row tuple as its record's ledger fields (the spool line's JSON object)."""
    return dict(zip(LEDGER_COLUMNS, row[:_N], strict=True)) | {"truncated": bool(row[_TRUNCATED])}


def count_lines(path: str) -> int:
    """Complete lines in a spool file (an estimate of its records, for health)."""
    try:
        with open(path, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except OSError:
        return 0


def read_spool_file(path: str) -> SpoolContents:
    """Parse a spool file into rows, malformed lines and a torn tail. Raises OSError."""
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    # split leaves the bytes after the last newline: empty for a well-ended file, else
    # the torn line of a write that never completed.
    tail = lines.pop()
    contents = SpoolContents([], [], tail or None)
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            fields = json.loads(raw)
            if (
                not isinstance(fields, dict)
                or not isinstance(fields.get("request_id"), str)
                or not fields["request_id"]
            ):
                raise ValueError("not a usage record with a request_id")
            contents.rows.append(record_to_row(UsageRecord(**fields)))
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            contents.bad.append((lineno, raw, f"{type(exc).__name__}: {exc}"[:300]))
    return contents


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
