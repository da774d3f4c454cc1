"""Budget counters, reservations and rate-limit buckets in the ledger database.

Every worker and replica that writes one ledger sees the same counters, because they are
rows of that database (schema v6: ``budgets``, ``budget_counters``,
``budget_reservations``, ``rate_buckets``); docs/design.md says why not Redis. Each
operation is one short transaction on one persistent connection per process:

- :meth:`BudgetStore.reserve`: for every budget the call falls under (in budget-id
  order, so concurrent transactions lock counters in one order and never deadlock) one
  conditional ``UPDATE ... SET reserved = reserved + :amount WHERE used + reserved +
  :amount <= :limit``; then the token buckets (``UPDATE`` with the refill computed in the
  statement and the same kind of condition); then the reservation rows. All or nothing:
  the first condition that fails rolls everything back and says which one and why.
  PostgreSQL's row lock makes a second writer wait and re-check the condition on the new
  row; SQLite's ``BEGIN IMMEDIATE`` serialises writers. No check-then-increment.
- :meth:`BudgetStore.settle`: after the call's ledger record is written: delete its
  reservation rows, move the counters from ``reserved`` to ``used`` (the actual amount),
  correct the token bucket by (actual - estimate).
- :meth:`BudgetStore.sweep_expired`: reservations of calls that never settled (a killed
  process) are deleted once past ``expires_at`` and their amounts leave ``reserved``.
- :meth:`BudgetStore.reconcile`: ``used`` is set to the ledger's own sum for the
  period, under the counter's row lock, leaving out records whose reservation is still
  held (their call has not settled yet: counting both would count them twice). After a
  crash, a restart, a spooled write or a ``bill reprice``, the counter equals the ledger.

Durability: the ledger is the truth, the counters are rebuilt from it, so this connection
does not fsync every commit (SQLite ``synchronous=NORMAL`` in WAL mode, PostgreSQL
``synchronous_commit=off``): a power cut may lose the last reservations, never a bill.
Blocking; the guard (billing/budget_guard.py) calls it from one worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from billing.budgets import METRICS, Budget
from billing.periods import CalendarPeriod, calendar_period
from exporters.ledger.dsn import redact_dsn
from exporters.ledger.reader import parse_ledger_url
from exporters.ledger.schema import normalize_ts

__all__ = [
    "BucketTake",
    "BudgetStore",
    "BudgetStoreError",
    "Claim",
    "Counter",
    "Refused",
]

_METRIC_SQL = {
    "cost": "COALESCE(u.cost_micros, 0)",
    "tokens": "u.billable_tokens",
    "characters": "u.characters",
    "requests": "1",
}
assert set(_METRIC_SQL) == set(METRICS)


class BudgetStoreError(Exception):
    """The budget tables could not be read or written (the message holds no password)."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """``amount`` of ``budget`` in ``period``, reserved by one call."""

    budget: Budget
    period: CalendarPeriod
    amount: int

    @property
    def key(self) -> tuple[str, str]:
        return self.budget.budget_id, normalize_ts(self.period.utc_start)


@dataclasses.dataclass(frozen=True)
class BucketTake:
    """Take ``need`` from bucket ``bucket`` (capacity ``capacity``, refilled ``rate``/s)."""

    bucket: str
    capacity: float
    rate: float
    need: float
    kind: str  # requests | tokens


@dataclasses.dataclass(frozen=True)
class Counter:
    """A budget's figures in one period."""

    used: int
    reserved: int


@dataclasses.dataclass(frozen=True)
class Refused:
    """Why :meth:`BudgetStore.reserve` took nothing: a budget (with its figures) or a
    bucket (with the seconds until it holds enough)."""

    claim: Claim | None = None
    counter: Counter | None = None
    take: BucketTake | None = None
    retry_after_s: float = 0.0


def _period_sum_sql(budget: Budget) -> tuple[str, tuple[Any, ...]]:
    """The ledger's sum for ``budget`` over [?, ?), without records still reserved."""
    key_filter = " AND u.api_key_id = ?" if budget.api_key_id is not None else ""
    sql = (
        f"SELECT COALESCE(SUM({_METRIC_SQL[budget.metric]}), 0) FROM usage_records u "
        f"WHERE u.tenant = ? AND u.status = 'ok' AND u.ts >= ? AND u.ts < ?{key_filter} "
        "AND NOT EXISTS (SELECT 1 FROM budget_reservations r WHERE r.budget_id = ? "
        "AND r.request_id = u.request_id AND r.record_ts = u.ts)"
    )
    extra = (budget.api_key_id,) if budget.api_key_id is not None else ()
    return sql, extra


class BudgetStore:
    """The budget tables of the ledger at ``ledger_url`` (SQLite or PostgreSQL).

    Opens (and migrates) the database at once; raises ValueError for a JSONL ledger and
    BudgetStoreError when the database cannot be opened. Thread-safe (one lock).
    """

    def __init__(self, ledger_url: str) -> None:
        kind, target = parse_ledger_url(ledger_url)
        if kind == "jsonl":
            raise ValueError(
                "budgets and rate limits live in the ledger database, which must be SQLite "
                f"or PostgreSQL; {redact_dsn(ledger_url)!r} is a JSONL log"
            )
        self.dialect = kind
        self._target = target
        self._lock = threading.Lock()
        self._conn: Any = None
        # Counters this connection has seen committed (so reserve skips creating them);
        # those created in the open transaction join only once it commits.
        self._known_counters: set[tuple[str, str]] = set()
        self._created: list[tuple[str, str]] = []
        if kind == "postgresql":
            self._least, self._greatest = "LEAST", "GREATEST"
        else:
            self._least, self._greatest = "MIN", "MAX"
        with self._lock:
            self._connection()

    def __repr__(self) -> str:
        return f"BudgetStore({redact_dsn(self._target)!r})"

    # -- connection -------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is not None and not self._broken(self._conn):
            return self._conn
        self._conn = None
        self._known_counters.clear()
        try:
            if self.dialect == "postgresql":
                from exporters.ledger.postgres import connect_postgres

                conn = connect_postgres(self._target, create=True)
                conn.execute("SET synchronous_commit = off")
            else:
                from exporters.ledger.sqlite import connect_sqlite

                conn = connect_sqlite(self._target, synchronous="NORMAL", create=True)
        except Exception as exc:
            raise BudgetStoreError(
                f"cannot open the budget tables of {redact_dsn(self._target)}: "
                f"{type(exc).__name__}"
            ) from None
        self._conn = conn
        return conn

    def _broken(self, conn: Any) -> bool:
        return self.dialect == "postgresql" and (conn.closed or conn.broken)

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A cursor in one write transaction, under the store's lock; database errors
        become BudgetStoreError (type only: a driver's message may quote the DSN)."""
        with self._lock:
            conn = self._connection()
            cur = conn.cursor()
            self._created.clear()
            try:
                cur.execute("BEGIN" if self.dialect == "postgresql" else "BEGIN IMMEDIATE")
                try:
                    yield cur
                except BaseException:
                    with contextlib.suppress(Exception):
                        cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
                self._known_counters.update(self._created)
            except BudgetStoreError:
                raise
            except _Rollback:
                raise
            except Exception as exc:
                if self._broken(conn):
                    self._conn = None
                if self.dialect == "sqlite" and conn.in_transaction:
                    with contextlib.suppress(Exception):
                        conn.execute("ROLLBACK")
                raise BudgetStoreError(f"budget store error: {type(exc).__name__}") from exc
            finally:
                with contextlib.suppress(Exception):
                    cur.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    # -- definitions ------------------------------------------------------------------

    def put(self, budget: Budget) -> None:
        """Create or replace the budget with ``budget``'s id."""
        with self._transaction() as cur:
            self._upsert(cur, budget)

    def _upsert(self, cur: Any, budget: Budget) -> None:
        cur.execute(
            self._sql(
                "INSERT INTO budgets (budget_id, tenant, api_key_id, period, metric, "
                "limit_amount, soft_fraction, source, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (budget_id) DO UPDATE SET limit_amount = excluded.limit_amount, "
                "soft_fraction = excluded.soft_fraction, source = excluded.source, "
                "updated_at = excluded.updated_at"
            ),
            (budget.budget_id, budget.tenant, budget.api_key_id, budget.period, budget.metric,
             budget.limit, budget.soft, budget.source, normalize_ts(_now())),
        )

    def remove(self, budget_id: str) -> bool:
        """Delete a budget (its counters stay, as history); False when there was none."""
        with self._transaction() as cur:
            cur.execute(self._sql("DELETE FROM budgets WHERE budget_id = ?"), (budget_id,))
            return cur.rowcount > 0

    def sync_config(self, budgets: Sequence[Budget]) -> None:
        """Make the config's budgets the stored ``source=config`` ones: add or update
        them, drop those no longer configured. A budget set from the CLI with the same id
        is left as the CLI set it (the later, deliberate change wins)."""
        ids = {b.budget_id for b in budgets}
        with self._transaction() as cur:
            cur.execute("SELECT budget_id, source FROM budgets")
            stored = dict(cur.fetchall())
            for budget_id, source in stored.items():
                if source == "config" and budget_id not in ids:
                    cur.execute(self._sql("DELETE FROM budgets WHERE budget_id = ?"), (budget_id,))
            for budget in budgets:
                if stored.get(budget.budget_id, "config") == "config":
                    self._upsert(cur, budget)

    def load(self) -> list[Budget]:
        """Every budget, by id."""
        with self._transaction() as cur:
            cur.execute(
                "SELECT tenant, api_key_id, period, metric, limit_amount, soft_fraction, source "
                "FROM budgets ORDER BY budget_id"
            )
            rows = cur.fetchall()
        return [
            Budget(t, k, p, m, int(limit), None if soft is None else float(soft), source)
            for t, k, p, m, limit, soft, source in rows
        ]

    # -- counters ---------------------------------------------------------------------

    def _ensure_counter(self, cur: Any, claim_budget: Budget, period: CalendarPeriod) -> None:
        key = (claim_budget.budget_id, normalize_ts(period.utc_start))
        if key in self._known_counters or key in self._created:
            return
        sum_sql, extra = _period_sum_sql(claim_budget)
        start, end = key[1], normalize_ts(period.utc_end)
        cur.execute(
            self._sql(
                "INSERT INTO budget_counters (budget_id, period_start, period_end, used, "
                f"reserved, reconciled_at) SELECT ?, ?, ?, ({sum_sql}), 0, ? "
                "WHERE true ON CONFLICT (budget_id, period_start) DO NOTHING"
            ),
            (key[0], start, end, normalize_ts(_now()), claim_budget.tenant, start, end, *extra,
             key[0]),
        )
        self._created.append(key)

    def reserve(
        self,
        claims: Sequence[Claim],
        takes: Sequence[BucketTake],
        *,
        reservation_id: str,
        request_id: str,
        record_ts: str,
        expires_at: float,
        now: float,
    ) -> tuple[Refused | None, dict[str, Counter]]:
        """Reserve every claim and take from every bucket, or nothing.

        Returns (None, counters after, by budget id) when reserved; (Refused, {}) when a
        budget or a bucket would be exceeded (the first found, in lock order)."""
        lock_order = sorted(claims, key=lambda c: c.key)
        after: dict[str, Counter] = {}
        refused: Refused | None = None
        try:
            with self._transaction() as cur:
                for claim in lock_order:
                    self._ensure_counter(cur, claim.budget, claim.period)
                    budget_key = claim.key
                    cur.execute(
                        self._sql(
                            "UPDATE budget_counters SET reserved = reserved + ? "
                            "WHERE budget_id = ? AND period_start = ? "
                            "AND used + reserved + ? <= ? RETURNING used, reserved"
                        ),
                        (claim.amount, *budget_key, claim.amount, claim.budget.limit),
                    )
                    row = cur.fetchone()
                    if row is None:
                        cur.execute(
                            self._sql(
                                "SELECT used, reserved FROM budget_counters "
                                "WHERE budget_id = ? AND period_start = ?"
                            ),
                            budget_key,
                        )
                        got = cur.fetchone() or (0, 0)
                        refused = Refused(claim=claim, counter=Counter(int(got[0]), int(got[1])))
                        raise _Rollback
                    after[claim.budget.budget_id] = Counter(int(row[0]), int(row[1]))
                for take in sorted(takes, key=lambda t: t.bucket):
                    level = self._take(cur, take, now)
                    if level is not None:
                        refused = Refused(
                            take=take, retry_after_s=max(0.0, (take.need - level) / take.rate)
                        )
                        raise _Rollback
                if lock_order:
                    cur.executemany(
                        self._sql(
                            "INSERT INTO budget_reservations (reservation_id, budget_id, "
                            "period_start, amount, request_id, record_ts, expires_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)"
                        ),
                        [
                            (reservation_id, *c.key, c.amount, request_id, record_ts, expires_at)
                            for c in lock_order
                        ],
                    )
        except _Rollback:
            return refused, {}
        return None, after

    def _take(self, cur: Any, take: BucketTake, now: float) -> float | None:
        """Take from one bucket; None when taken, else its level (after refill)."""
        least, greatest = self._least, self._greatest
        refill = f"{least}(?, level + {greatest}(0, ? - updated_at) * ?)"
        cur.execute(
            self._sql(
                "INSERT INTO rate_buckets (bucket, level, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (bucket) DO NOTHING"
            ),
            (take.bucket, take.capacity, now),
        )
        cur.execute(
            self._sql(
                f"UPDATE rate_buckets SET level = {refill} - ?, "
                f"updated_at = {greatest}(updated_at, ?) WHERE bucket = ? AND {refill} >= ? "
                "RETURNING level"
            ),
            (take.capacity, now, take.rate, take.need, now, take.bucket,
             take.capacity, now, take.rate, take.need),
        )
        if cur.fetchone() is not None:
            return None
        cur.execute(
            self._sql(f"SELECT {refill} FROM rate_buckets WHERE bucket = ?"),
            (take.capacity, now, take.rate, take.bucket),
        )
        row = cur.fetchone()
        return float(row[0]) if row is not None else 0.0

    def settle(
        self,
        reservation_id: str,
        actuals: Sequence[tuple[Claim, int]],
        bucket_corrections: Sequence[tuple[BucketTake, float]] = (),
    ) -> dict[str, tuple[Counter, int]]:
        """Release the reservation and add each claim's actual amount to ``used``;
        ``bucket_corrections``: (bucket, amount to give back; negative takes more).

        Returns {budget id: (counter after, actual added)}. A reservation already swept
        (past its expiry) leaves ``reserved`` alone and still adds the actual."""
        out: dict[str, tuple[Counter, int]] = {}
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "DELETE FROM budget_reservations WHERE reservation_id = ? "
                    "RETURNING budget_id, amount"
                ),
                (reservation_id,),
            )
            held = {row[0]: int(row[1]) for row in cur.fetchall()}
            for claim, actual in sorted(actuals, key=lambda pair: pair[0].key):
                release = held.get(claim.budget.budget_id, 0)
                cur.execute(
                    self._sql(
                        "UPDATE budget_counters SET used = used + ?, reserved = reserved - ? "
                        "WHERE budget_id = ? AND period_start = ? RETURNING used, reserved"
                    ),
                    (actual, release, *claim.key),
                )
                row = cur.fetchone()
                if row is not None:
                    out[claim.budget.budget_id] = (Counter(int(row[0]), int(row[1])), actual)
            least = self._least
            for take, give_back in sorted(bucket_corrections, key=lambda p: p[0].bucket):
                if give_back:
                    cur.execute(
                        self._sql(
                            f"UPDATE rate_buckets SET level = {least}(?, level + ?) "
                            "WHERE bucket = ?"
                        ),
                        (take.capacity, give_back, take.bucket),
                    )
        return out

    def sweep_expired(self, now: float) -> set[str]:
        """Delete reservations past ``expires_at``, returning their amounts to the
        counters; the ids of the budgets whose reservations were swept (reconcile them:
        a swept call may have been billed before its process died)."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "DELETE FROM budget_reservations WHERE expires_at < ? "
                    "RETURNING budget_id, period_start, amount"
                ),
                (now,),
            )
            rows = cur.fetchall()
            totals: dict[tuple[str, str], int] = {}
            for budget_id, period_start, amount in rows:
                key = (budget_id, period_start)
                totals[key] = totals.get(key, 0) + int(amount)
            for key in sorted(totals):
                cur.execute(
                    self._sql(
                        "UPDATE budget_counters SET reserved = reserved - ? "
                        "WHERE budget_id = ? AND period_start = ?"
                    ),
                    (totals[key], *key),
                )
        return {key[0] for key in totals}

    def reconcile(self, budget: Budget, period: CalendarPeriod) -> Counter:
        """Set ``used`` to the ledger's sum for the period (see the module docstring)."""
        start, end = normalize_ts(period.utc_start), normalize_ts(period.utc_end)
        sum_sql, extra = _period_sum_sql(budget)
        with self._transaction() as cur:
            self._ensure_counter(cur, budget, period)
            lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
            cur.execute(
                self._sql(
                    "SELECT used FROM budget_counters WHERE budget_id = ? AND period_start = ?"
                    + lock
                ),
                (budget.budget_id, start),
            )
            # A new statement: in PostgreSQL it sees every commit made before the lock.
            cur.execute(self._sql(sum_sql), (budget.tenant, start, end, *extra, budget.budget_id))
            total = int(cur.fetchone()[0])
            cur.execute(
                self._sql(
                    "UPDATE budget_counters SET used = ?, reconciled_at = ? "
                    "WHERE budget_id = ? AND period_start = ? RETURNING used, reserved"
                ),
                (total, normalize_ts(_now()), budget.budget_id, start),
            )
            row = cur.fetchone()
        return Counter(int(row[0]), int(row[1]))

    def reconcile_all(self, budgets: Iterable[Budget], zone: Any) -> int:
        """Reconcile every stored counter of ``budgets`` (all periods: a reprice can move
        any of them); periods are those of ``zone`` (a ZoneInfo) holding each counter's
        start. Returns the number of counters reconciled."""
        by_id = {b.budget_id: b for b in budgets}
        with self._transaction() as cur:
            cur.execute("SELECT budget_id, period_start FROM budget_counters")
            rows = [r for r in cur.fetchall() if r[0] in by_id]
        for budget_id, start in rows:
            budget = by_id[budget_id]
            moment = _dt.datetime.fromisoformat(start)
            self.reconcile(budget, calendar_period(budget.period, zone, moment))
        return len(rows)

    def counter(self, budget: Budget, period: CalendarPeriod) -> Counter:
        """The budget's figures in ``period``: its counter, else the ledger's sum (read
        only: nothing is created)."""
        start, end = normalize_ts(period.utc_start), normalize_ts(period.utc_end)
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT used, reserved FROM budget_counters "
                    "WHERE budget_id = ? AND period_start = ?"
                ),
                (budget.budget_id, start),
            )
            row = cur.fetchone()
            if row is not None:
                return Counter(int(row[0]), int(row[1]))
            sum_sql, extra = _period_sum_sql(budget)
            cur.execute(self._sql(sum_sql), (budget.tenant, start, end, *extra, budget.budget_id))
            return Counter(int(cur.fetchone()[0]), 0)

    def reservations(self) -> int:
        """How many reservation rows are held now (all budgets)."""
        with self._transaction() as cur:
            cur.execute("SELECT COUNT(*) FROM budget_reservations")
            return int(cur.fetchone()[0])


class _Rollback(Exception):
    """Internal: end a transaction without its changes."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)
