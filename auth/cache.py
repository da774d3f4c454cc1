"""A per-process copy of the key table, so checking a key is a dict read, not a query.

:class:`KeyCache` loads every key at start, then a daemon thread re-reads the table every
``ttl_s`` seconds and writes the last-use times gathered meanwhile. So a key revoked or
rotated anywhere (CLI, key API, another replica) is refused by every worker within
``ttl_s`` plus one table read. A key created since the last read works at once: an id not
in the copy costs one ``store.get``, and the miss is remembered for ``ttl_s`` (at most
10,000 ids), so a stream of made-up ids costs at most one read per id and ttl. When the
table cannot be read the last copy is kept and the read retried each tick; once the last
good read is older than ``max_stale_s``, :meth:`KeyCache.lookup` raises
:class:`KeyStoreUnavailable` (the server answers 503 rather than trust a stale copy for
ever). Failures are logged by exception type only: a driver message can quote a DSN.
"""

from __future__ import annotations

import collections
import datetime as _dt
import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from auth.keys import ApiKey, KeyStore

__all__ = ["MAX_REMEMBERED_MISSES", "KeyCache", "KeyStoreUnavailable"]

log = logging.getLogger(__name__)

MAX_REMEMBERED_MISSES = 10_000
_INFLIGHT_WAIT_S = 30.0


class KeyStoreUnavailable(RuntimeError):
    """The key table has not been read for longer than max_stale_s (or never)."""


class KeyCache:
    """The key table of ``store``, re-read every ``ttl_s`` seconds by a daemon thread."""

    def __init__(self, store: KeyStore, *, ttl_s: float, max_stale_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, not {ttl_s!r}")
        if not max_stale_s >= ttl_s:
            raise ValueError(f"max_stale_s ({max_stale_s!r}) must be at least ttl_s ({ttl_s!r})")
        self._store = store
        self._ttl_s = float(ttl_s)
        self._max_stale_s = float(max_stale_s)
        self._keys: dict[str, ApiKey] = {}
        self._loaded_at: float | None = None  # time.monotonic() of the last good read
        self._misses: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._inflight: dict[str, threading.Event] = {}
        self._used: dict[str, float] = {}  # key id -> time.time() of its latest use
        self._lock = threading.Lock()  # misses, inflight, used
        self._load_lock = threading.Lock()  # one table read at a time, assigned in order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    def start(self) -> None:
        """Read the whole table (raising what the store raises), then start the thread."""
        if self._thread is not None:
            return
        self._load()
        self._thread = threading.Thread(target=self._run, name="key-cache", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        with self._load_lock:
            keys = self._store.load_all()
            self._keys = keys
            self._loaded_at = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self._ttl_s):
            self._flush()
            try:
                self._load()
            except Exception as exc:  # keep the copy; retry next tick
                log.warning(
                    "reading the key table failed; keeping the last copy",
                    extra={"error": type(exc).__name__, "stale_s": round(self.stale_s(), 1)},
                )

    def stale_s(self) -> float:
        """Seconds since the last good read of the table (inf before the first)."""
        loaded = self._loaded_at
        return float("inf") if loaded is None else time.monotonic() - loaded

    def lookup(self, key_id: str) -> ApiKey | None:
        """The record of ``key_id``, or None when there is no such key.

        Raises KeyStoreUnavailable when the copy is older than max_stale_s.
        """
        loaded = self._loaded_at
        if loaded is None or time.monotonic() - loaded > self._max_stale_s:
            raise KeyStoreUnavailable(
                "the API key table has not been readable for more than "
                f"{self._max_stale_s:g} s (auth.max_stale_s)"
                if loaded is not None
                else "the API key table has not been read yet"
            )
        key = self._keys.get(key_id)
        if key is not None:
            return key
        return self._miss(key_id)

    def _miss(self, key_id: str) -> ApiKey | None:
        """Not in the copy: one store read per id and ttl, shared by concurrent callers."""
        now = time.monotonic()
        with self._lock:
            until = self._misses.get(key_id)
            if until is not None and until > now:
                return None
            waiting = self._inflight.get(key_id)
            if waiting is None:
                done = self._inflight[key_id] = threading.Event()
        if waiting is not None:  # another thread is reading this id: use its answer
            waiting.wait(_INFLIGHT_WAIT_S)
            return self._keys.get(key_id)
        key = None
        try:
            key = self._store.get(key_id)
        except Exception as exc:
            # Answered as unknown (refused) and remembered, so a failing store is not
            # asked again for this id before the next tick.
            log.warning("reading an API key failed", extra={"error": type(exc).__name__})
        finally:
            with self._lock:
                if key is None:
                    self._misses[key_id] = time.monotonic() + self._ttl_s
                    self._misses.move_to_end(key_id)
                    while len(self._misses) > MAX_REMEMBERED_MISSES:
                        self._misses.popitem(last=False)
                else:
                    self._misses.pop(key_id, None)
                    self._keys[key_id] = key
                del self._inflight[key_id]
            done.set()
        return key

    def note_used(self, key_id: str) -> None:
        """Remember that ``key_id`` was used now (written by the next tick; no I/O)."""
        # One dict store, atomic under the GIL, no lock: a store racing the tick's swap of
        # the dict is at worst a last-use time written one tick later (by the next call).
        self._used[key_id] = time.time()

    def _flush(self) -> None:
        with self._lock:
            used, self._used = self._used, {}
        if not used:
            return
        try:
            self._store.touch({
                k: _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat()
                for k, t in used.items()
            })
        except Exception as exc:
            with self._lock:  # try again next tick, keeping the latest time of each key
                for k, t in used.items():
                    if self._used.get(k, 0.0) < t:
                        self._used[k] = t
            log.warning("writing key last-use times failed", extra={"error": type(exc).__name__})

    def refresh(self) -> None:
        """Write last-use times and re-read the table now (raises what the store raises)."""
        self._flush()
        self._load()

    def close(self) -> None:
        """Stop the thread and write the last-use times; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._flush()
