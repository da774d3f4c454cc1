"""``GET /metrics`` of a server with ``--workers N``: every worker's series in every scrape.

The kernel hands each scrape to one worker (SO_REUSEPORT), and each worker has its own
instruments, so without help a counter jumps between the workers' values from scrape to
scrape. Here each worker labels its series ``worker="<index>"`` (stable across restarts:
the index, not the pid), writes that exposition to ``<data_dir>/metrics/worker-<i>.prom``
every ``interval_s`` (atomically: write, fsync-free rename), and answers a scrape with its
own live series plus its siblings' latest snapshots, merged family by family. So one scrape
holds one series per worker and per label set; a dashboard sums them
(``sum without (worker) (...)``) for counters and histograms, and takes ``max without
(worker)`` for gauges every worker reports alike (budgets, ledger health of a shared
ledger). A sibling's figures are at most ``interval_s`` (+ one write) old; a snapshot
older than ``stale_after_s`` (a worker that died and was not restarted) is left out.

Only for N > 1; a single process's exposition is unchanged (no ``worker`` label).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["WORKER_LABEL", "WorkerMetrics"]

log = logging.getLogger(__name__)

WORKER_LABEL = "worker"


class _Families:
    """A prometheus_client collector over already-built metric families."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families


def _render(families: list[Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def _labelled(text: str, worker: str) -> list[Any]:
    families = []
    for family in text_string_to_metric_families(text):
        family.samples = [s._replace(labels={**s.labels, WORKER_LABEL: worker})
                          for s in family.samples]
        families.append(family)
    return families


def _merge(groups: Iterable[list[Any]]) -> list[Any]:
    """One family per name, with the samples of every group (first group's help/type)."""
    merged: dict[str, Any] = {}
    for families in groups:
        for family in families:
            kept = merged.get(family.name)
            if kept is None:
                merged[family.name] = family
            elif kept.type == family.type:
                kept.samples = [*kept.samples, *family.samples]
    return list(merged.values())


class WorkerMetrics:
    """The merged exposition of worker ``worker`` of ``workers`` (see module docstring)."""

    def __init__(
        self,
        render_own: Callable[[], bytes],
        *,
        worker: int,
        workers: int,
        directory: Path,
        interval_s: float = 1.0,
        stale_after_s: float = 30.0,
    ) -> None:
        self._render_own = render_own
        self.worker = worker
        self.workers = workers
        self.directory = Path(directory)
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A previous process with this index may have left a snapshot: not ours.
        with contextlib.suppress(FileNotFoundError):
            self._path(worker).unlink()

    def _path(self, worker: int) -> Path:
        return self.directory / f"worker-{worker}.prom"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._snapshots, name="metrics-snapshot",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _own(self) -> list[Any]:
        return _labelled(self._render_own().decode("utf-8"), str(self.worker))

    def _snapshots(self) -> None:
        while not self._stop.is_set():
            try:
                body = _render(self._own())
                path = self._path(self.worker)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(body)
                os.replace(tmp, path)
            except Exception as exc:  # a full disk must not stop the worker
                log.warning("metrics snapshot failed: %s", type(exc).__name__,
                            extra={"error_type": type(exc).__name__})
            self._stop.wait(self.interval_s)

    def render(self) -> bytes:
        """This worker's live series and its siblings' latest snapshots, merged."""
        groups = [self._own()]
        now = time.time()
        for other in range(self.workers):
            if other == self.worker:
                continue
            path = self._path(other)
            try:
                if now - path.stat().st_mtime > self.stale_after_s:
                    continue
                groups.append(list(text_string_to_metric_families(path.read_text("utf-8"))))
            except (OSError, ValueError):  # not written yet, or mid-replace on another fs
                continue
        return _render(_merge(groups))
