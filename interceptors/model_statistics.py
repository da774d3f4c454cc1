"""Per-model inference statistics, as Triton's statistics extension reports them.

Fed from exactly one place: :meth:`interceptors.call.MeteredCall.finish`, where the ledger
record of a model call is made. A call counts here when, and only when, this process wrote
its record: an ``ok`` record is a success (``inference_count``, ``execution_count``,
``success`` and the stage durations), any other status a ``fail``. So ``inference_count``
of a model equals the ``ok`` ledger rows this process wrote for it; refusals (budgets,
rate limits, authentication, a reused request id) and replays write no record and are not
counted, calls with no model (health, metadata) neither. Counters live in this process
(with ``server.workers: N`` each worker reports its own calls): :data:`PROCESS_STATISTICS`
is the one every metering core of the process feeds and the OIP frontends read.

The stage durations come from a :class:`CallClock` that a metered call binds for its
handler (a context variable, so the inference thread sees it too): the serving code adds
the time it spent decoding inputs (``compute_input``), waiting for an inference thread
(``queue``), in the model (``compute_infer``) and encoding outputs (``compute_output``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = [
    "CallClock",
    "ModelStatistics",
    "PROCESS_STATISTICS",
    "bind_clock",
    "current_clock",
    "timed",
    "unbind_clock",
]

_STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclasses.dataclass
class CallClock:
    """Nanoseconds one call spent in each stage; added to by the serving code."""

    queue: int = 0
    compute_input: int = 0
    compute_infer: int = 0
    compute_output: int = 0

    def add(self, stage: str, ns: int) -> None:
        setattr(self, stage, getattr(self, stage) + max(0, ns))


_clock: contextvars.ContextVar[CallClock | None] = contextvars.ContextVar(
    "paddle_meter_call_clock", default=None
)


def current_clock() -> CallClock | None:
    """The clock of the metered call being served, or None (metering off)."""
    return _clock.get()


def bind_clock(clock: CallClock | None) -> contextvars.Token:
    """Make ``clock`` current; give the token back to :func:`unbind_clock`."""
    return _clock.set(clock)


def unbind_clock(token: contextvars.Token) -> None:
    _clock.reset(token)


@contextlib.contextmanager
def timed(stage: str) -> Iterator[None]:
    """Add the block's duration to ``stage`` of the current call's clock (if any)."""
    clock = _clock.get()
    if clock is None:
        yield
        return
    start = time.perf_counter_ns()
    try:
        yield
    finally:
        clock.add(stage, time.perf_counter_ns() - start)


@dataclasses.dataclass
class _Model:
    last_inference_ms: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    stage_ns: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(_STAGES, 0))


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


class ModelStatistics:
    """Cumulative counters per (model, version) since this process started; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], _Model] = {}

    def observe(
        self,
        model: str,
        version: str,
        *,
        ok: bool,
        duration_ns: int,
        clock: CallClock | None,
        end_ms: int | None = None,
    ) -> None:
        """One call whose ledger record was written: ``ok`` (an ``ok`` record) or failed."""
        end_ms = int(time.time() * 1000) if end_ms is None else end_ms
        with self._lock:
            entry = self._models.get((model, version))
            if entry is None:
                entry = self._models[(model, version)] = _Model()
            entry.last_inference_ms = max(entry.last_inference_ms, end_ms)
            if not ok:
                entry.fail_count += 1
                entry.fail_ns += max(0, duration_ns)
                return
            entry.success_count += 1
            entry.success_ns += max(0, duration_ns)
            if clock is not None:
                for stage in _STAGES:
                    entry.stage_ns[stage] += getattr(clock, stage)

    def model_stat(self, model: str, version: str) -> dict[str, Any]:
        """Triton's ``$model_stat`` JSON object for one model version (zeros if unused)."""
        with self._lock:
            entry = dataclasses.replace(self._models.get((model, version)) or _Model())
            entry.stage_ns = dict(entry.stage_ns)
        done = entry.success_count
        stages = {stage: _duration(done, entry.stage_ns[stage]) for stage in _STAGES}
        return {
            "name": model,
            "version": version,
            "last_inference": entry.last_inference_ms,
            # One request is one execution: no model here batches requests the way
            # Triton's max_batch_size means (their config says max_batch_size 0).
            "inference_count": done,
            "execution_count": done,
            "inference_stats": {
                "success": _duration(done, entry.success_ns),
                "fail": _duration(entry.fail_count, entry.fail_ns),
                **stages,
                "cache_hit": _duration(0, 0),
                "cache_miss": _duration(0, 0),
            },
            "batch_stats": (
                [
                    {
                        "batch_size": 1,
                        "compute_input": stages["compute_input"],
                        "compute_infer": stages["compute_infer"],
                        "compute_output": stages["compute_output"],
                    }
                ]
                if done
                else []
            ),
            "memory_usage": [],
        }


#: The statistics of this process: fed by every MeteringCore, read by the OIP frontends.
PROCESS_STATISTICS = ModelStatistics()
