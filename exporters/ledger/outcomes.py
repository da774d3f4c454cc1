"""The write outcome of each record of a batch: the one home of the idempotency rules.

Every writer (SQLite, PostgreSQL, JSONL) inserts the batch's unique entries and learns
which were new; :func:`resolve_outcomes` then works out, in the same transaction, what
each submitter is told (see :class:`~exporters.ledger.base.WriteOutcome`):

* a new record: ``inserted``;
* an ok record not inserted (its (tenant, request_id) already has an ok record, committed
  or earlier in this batch): ``existing`` = that record's figures; when the payload hash
  matches, the replay is counted in ``request_replays`` and ``replays`` is the count after
  it (several replays of one key in a batch get consecutive counts);
* a failed attempt not inserted (the same attempt again, e.g. a spool replay): a plain
  dedupe.

The writer supplies how to read an entry (``view``), how to fetch the figures of already
committed ok records and how to add to the replay counters; only the rare not-inserted
records cost any of that, so a batch without duplicates returns at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from exporters.ledger.base import BilledRecord, WriteOutcome

__all__ = ["EntryView", "TenantRequest", "conflicting", "resolve_outcomes", "split_repeats"]

TenantRequest = tuple[str, str]
"""(tenant, request_id): the key of the one ok record, and of request_replays."""


@dataclasses.dataclass(frozen=True)
class EntryView:
    """How to read a writer's queued entry (a row tuple, or a UsageRecord for JSONL)."""

    key: Callable[[Any], tuple[str, str, str]]  # (tenant, request_id, attempt); attempt '' = ok
    billed: Callable[[Any], BilledRecord]  # the figures of an ok entry


def split_repeats(
    entries: Sequence[Any], key: Callable[[Any], Any]
) -> tuple[Sequence[Any], list[Any], list[int] | None]:
    """(unique, repeats, order): the first entry of each key, then the later ones.

    ``order`` maps each position of ``entries`` to its position in ``unique + repeats``
    (None when there are no repeats: then ``unique`` is ``entries`` itself).
    """
    keys = list(map(key, entries))
    if len(set(keys)) == len(keys):
        return entries, [], None  # the usual case: no retry within the batch
    seen: set[Any] = set()
    unique: list[Any] = []
    repeats: list[Any] = []
    where: list[tuple[bool, int]] = []
    for entry, k in zip(entries, keys, strict=True):
        if k in seen:
            where.append((True, len(repeats)))
            repeats.append(entry)
        else:
            seen.add(k)
            where.append((False, len(unique)))
            unique.append(entry)
    n = len(unique)
    return unique, repeats, [n + i if rep else i for rep, i in where]


def resolve_outcomes(
    unique: Sequence[Any],
    flags: Sequence[bool],
    repeats: Sequence[Any],
    view: EntryView,
    *,
    fetch_existing: Callable[[list[TenantRequest]], dict[TenantRequest, BilledRecord]],
    add_replays: Callable[[dict[TenantRequest, int]], dict[TenantRequest, int]] | None,
) -> list[WriteOutcome]:
    """Outcomes for ``unique`` (with the writer's ``flags``: True where inserted), then
    for ``repeats`` (later entries of a key already in ``unique``; never inserted).

    ``fetch_existing(keys)``: figures of the committed ok records of those (tenant,
    request_id) (inside the writer's transaction). ``add_replays({key: n})``: add n to
    each key's replay count, return the counts after; None (spool replay) counts nothing.
    """
    if not repeats and all(flags):
        return [WriteOutcome(True) for _ in flags]
    key = view.key
    outcomes: list[WriteOutcome | None] = []
    known: dict[TenantRequest, BilledRecord] = {}  # ok records inserted in this batch
    wanted: list[tuple[int, Any, TenantRequest]] = []  # (position, entry, key) to resolve
    for i, (entry, new) in enumerate(zip(unique, flags, strict=True)):
        tenant, request_id, attempt = key(entry)
        if new:
            outcomes.append(WriteOutcome(True))
            if attempt == "" and repeats:
                known[(tenant, request_id)] = view.billed(entry)
        elif attempt == "":
            outcomes.append(None)
            wanted.append((i, entry, (tenant, request_id)))
        else:
            outcomes.append(WriteOutcome(False))
    for j, entry in enumerate(repeats, start=len(unique)):
        tenant, request_id, attempt = key(entry)
        if attempt == "":
            outcomes.append(None)
            wanted.append((j, entry, (tenant, request_id)))
        else:
            outcomes.append(WriteOutcome(False))
    if wanted:
        missing = sorted({k for _, _, k in wanted} - known.keys())
        existing = {**(fetch_existing(missing) if missing else {}), **known}
        replayed: list[tuple[int, TenantRequest, BilledRecord, int]] = []
        bumps: dict[TenantRequest, int] = {}
        for pos, entry, k in wanted:
            ex = existing.get(k)
            if (
                ex is not None
                and add_replays is not None
                and ex.content_sha256 == view.billed(entry).content_sha256
            ):
                bumps[k] = bumps.get(k, 0) + 1
                replayed.append((pos, k, ex, bumps[k]))
            else:
                outcomes[pos] = WriteOutcome(False, existing=ex)
        if replayed:
            after = add_replays(bumps)  # type: ignore[misc]
            for pos, k, ex, nth in replayed:
                outcomes[pos] = WriteOutcome(False, existing=ex, replays=after[k] - bumps[k] + nth)
    return outcomes  # type: ignore[return-value]


def conflicting(
    entries: Iterable[Any], outcomes: Iterable[WriteOutcome], view: EntryView
) -> list[tuple[Any, BilledRecord]]:
    """(entry, billed figures) of the ok entries not inserted because their (tenant,
    request_id) is billed with another payload (``content_sha256``)."""
    return [
        (entry, out.existing)
        for entry, out in zip(entries, outcomes, strict=True)
        if out.existing is not None
        and out.existing.content_sha256 != view.billed(entry).content_sha256
    ]
