"""Spool replay, the half of the group-commit writer thread that drains the spool.

Mixed into :class:`~exporters.ledger.group_commit.GroupCommitWriter` and run only on its
thread. Order of every replay: commit the file's records (idempotent), quarantine its
malformed lines, set aside its conflicts, and only then empty or delete the file, so a
crash at any point leaves every record either in the database, in the quarantine or
conflicts file, or still in the spool. A *conflict* is a spooled ok record whose
(tenant, request_id) was billed meanwhile with another payload (``content_sha256``): it
is not written (the key allows one billed record) but copied to ``conflicts.jsonl``
(0600) with the billed figures, counted in ``stats.conflicts`` and logged at ERROR; a
spooled record with the same payload as the billed one is an ordinary dedupe. Failures
are WARNING (at most once per ``_LOG_EVERY_S`` while they repeat), quarantines and
conflicts are ERROR.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from exporters.ledger.spool import (
    CONFLICTS_NAME,
    QUARANTINE_NAME,
    Spool,
    SpoolContents,
    count_lines,
    read_spool_file,
)

if TYPE_CHECKING:
    from exporters.ledger.group_commit import LedgerStats

__all__ = ["SpoolReplay"]

_log = logging.getLogger("exporters.ledger.group_commit")

_LOG_EVERY_S = 30.0  # while a replay keeps failing, repeat its warning this often


class SpoolReplay:
    """Replay methods; the writer provides the attributes and helpers declared here."""

    stats: LedgerStats
    _spool: Spool | None
    _orphan_pending: dict[str, int]
    _warned_at: float
    _last_failure: float
    _retry_interval_s: float
    _db_ok: bool
    _describe: Callable[[BaseException], str]
    _count_pending: Callable[[], None]
    _key: Callable[[Any], tuple[str, str, str]]
    _commit_chunks: Callable[[Sequence[Any]], list[tuple[Any, Any]]]

    def _replay(self, *, force: bool = False) -> None:
        """Move spooled records (orphans', then our own) into the database.

        Idempotent. Unless ``force``, not attempted within ``retry_interval_s`` of a
        database failure (so a down database costs one timeout per interval, not per batch).
        """
        spool = self._spool
        if spool is None:
            return
        if not force and time.monotonic() - self._last_failure < self._retry_interval_s:
            return
        self._replay_orphans()  # a listdir; callers already bound how often this runs
        if not spool.pending:
            self._count_pending()
            return
        try:
            contents = spool.read_own()
            conflicts = self._commit_chunks(contents.rows)
        except Exception as exc:
            self._replay_failed(exc, spool.path)
            return
        if not self._set_aside(spool.path, contents, conflicts):
            return  # nothing removed: retried next time
        spool.clear_own()
        self._replayed(len(contents.rows) - len(conflicts), "this process's spool")

    def _replay_orphans(self) -> None:
        """Replay spool files left by processes that died before replaying them."""
        try:
            for path, fd in self._spool.orphans():  # type: ignore[union-attr]
                try:
                    contents = read_spool_file(path)
                    conflicts = self._commit_chunks(contents.rows)
                    if not self._set_aside(path, contents, conflicts):
                        self._orphan_pending[path] = len(contents.rows)
                        continue
                    os.unlink(path)  # only now: every record is in the database
                    self._orphan_pending.pop(path, None)
                    self._replayed(
                        len(contents.rows) - len(conflicts),
                        f"orphaned spool {os.path.basename(path)}",
                    )
                except Exception as exc:
                    self._orphan_pending[path] = count_lines(path)
                    self._replay_failed(exc, path)
                    break  # the database is likely down: one timeout per attempt is enough
                finally:
                    os.close(fd)
        except OSError as exc:
            self._replay_failed(exc, self._spool.directory)  # type: ignore[union-attr]
        for path in [p for p in self._orphan_pending if not os.path.exists(p)]:
            del self._orphan_pending[path]  # replayed by another process meanwhile
        self._count_pending()

    def _set_aside(
        self, path: str, contents: SpoolContents, conflicts: Sequence[tuple[Any, Any]] = ()
    ) -> bool:
        """Quarantine malformed lines, set aside conflicts, log a torn tail; False if
        writing the quarantine or conflicts file failed (the spool file is then kept, and
        the next replay finds the same lines again)."""
        name = os.path.basename(path)
        if conflicts:
            try:
                self._spool.record_conflicts(path, conflicts)  # type: ignore[union-attr]
            except OSError as exc:
                _log.error(
                    "could not record %d conflicting records of spool %s (%s); the file is kept",
                    len(conflicts),
                    name,
                    self._describe(exc),
                )
                return False
            self.stats.conflicts += len(conflicts)
            _log.error(
                "%d spooled usage records of %s were not billed: their (tenant, request_id) "
                "is already billed for another payload; set aside in %s (request ids %s)",
                len(conflicts),
                name,
                os.path.join(self._spool.directory, CONFLICTS_NAME),  # type: ignore[union-attr]
                ",".join("/".join(self._key(row)[:2]) for row, _ in conflicts[:20]),
            )
        if contents.torn is not None:
            self.stats.torn_lines += 1
            _log.warning(
                "dropped the unterminated last line of spool %s (%d bytes): a write "
                "interrupted by a crash, never acknowledged",
                name,
                len(contents.torn),
            )
        if not contents.bad:
            return True
        try:
            self._spool.quarantine(path, contents.bad)  # type: ignore[union-attr]
        except OSError as exc:
            _log.error(
                "could not quarantine %d malformed lines of spool %s (%s); the file is kept",
                len(contents.bad),
                name,
                self._describe(exc),
            )
            return False
        self.stats.quarantined += len(contents.bad)
        _log.error(
            "quarantined %d malformed lines of spool %s (lines %s) in %s: they are "
            "not billed until repaired by hand",
            len(contents.bad),
            name,
            ",".join(str(b[0]) for b in contents.bad[:20]),
            os.path.join(self._spool.directory, QUARANTINE_NAME),
        )  # type: ignore[union-attr]
        return True

    def _replayed(self, n: int, what: str) -> None:
        self.stats.replayed += n
        self._count_pending()
        self._warned_at = 0.0
        _log.warning("replayed %d spooled usage records from %s into the ledger", n, what)

    def _replay_failed(self, exc: BaseException, path: str) -> None:
        self.stats.replay_errors += 1
        self._db_ok = False  # counted as a replay error, not as a failed write transaction
        self._last_failure = time.monotonic()
        self._count_pending()
        now = time.monotonic()
        if now - self._warned_at >= _LOG_EVERY_S:
            self._warned_at = now
            _log.warning(
                "spool replay of %s failed (%s); %d records kept in the spool and "
                "retried every %.1fs",
                os.path.basename(path),
                self._describe(exc),
                self.stats.spool_pending,
                self._retry_interval_s,
            )
