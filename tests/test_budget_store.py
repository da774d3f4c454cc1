"""The budget counters in the real ledger databases (SQLite and PostgreSQL), without a server.

- Reservations are atomic: 64 threads, each with its own connection (as 64 workers would
  be), reserve against a limit that allows exactly 20: exactly 20 get it, never 21.
- Period boundaries in Asia/Shanghai: ledger records at 23:59:59 and 00:00:00 local land in
  different days' counters (and in different report days).
- A reservation its process never settled expires, and its amount leaves ``reserved``.
- Reconciliation sets ``used`` to the ledger's sum, leaving out records whose call still
  holds its reservation; ``bill reprice`` moves a cost budget's ``used``.
- Token buckets refill at their rate and refuse with the time until enough is back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import re
import threading
import time

import pytest
from support.pg import temporary_database

from billing.budget_store import BucketTake, BudgetStore, Claim
from billing.budgets import Budget
from billing.periods import calendar_period, load_zone
from billing.report import build_report
from exporters.ledger import LedgerReader, open_ledger
from exporters.ledger.schema import normalize_ts
from exporters.usage_record import UsageRecord
from serving.cli import main as cli_main

SHANGHAI = load_zone("Asia/Shanghai")
BASE = UsageRecord(
    request_id="", ts="", duration_ms=5.0, tenant="bj", api_key_id=None, model="ernie",
    model_version="1", operation="text_classification", protocol="http",
    endpoint="/v2/models/ernie/infer", status="ok", input_tokens=10, billable_tokens=10,
    cost="0.040000",
)
LATE = "2026-12-31T15:59:59.500000+00:00"  # 23:59:59.5 on Dec 31 in Shanghai
MIDNIGHT = "2026-12-31T16:00:00.000000+00:00"  # 00:00:00 on Jan 1 2027 in Shanghai


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        url = str(tmp_path / "ledger.sqlite3")
        open_ledger(url).shutdown()
        yield url
        return
    with temporary_database("pm_budget") as url:
        open_ledger(url).shutdown()
        yield url


def _write(url: str, *records: UsageRecord) -> None:
    sink = open_ledger(url)
    try:
        sink.write_batch(list(records))
    finally:
        sink.shutdown()


def _period(name: str, at: str):
    return calendar_period(name, SHANGHAI, dt.datetime.fromisoformat(at))


def test_reservations_are_atomic_across_64_connections(ledger_url):
    budget = Budget("race", None, "month", "tokens", 100)
    setup = BudgetStore(ledger_url)
    setup.put(budget)
    period = _period("month", MIDNIGHT)
    setup.reconcile(budget, period)
    stores = [BudgetStore(ledger_url) for _ in range(64)]
    start = threading.Barrier(64)
    got: list[bool] = []

    def reserve(n: int) -> None:
        start.wait()
        refused, _ = stores[n].reserve(
            [Claim(budget, period, 5)], [], reservation_id=f"r{n}", request_id=f"q{n}",
            record_ts=MIDNIGHT, expires_at=time.time() + 60, now=time.time(),
        )
        got.append(refused is None)

    threads = [threading.Thread(target=reserve, args=(n,)) for n in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(got) == 20 and len(got) == 64
    counter = setup.counter(budget, period)
    assert (counter.used, counter.reserved) == (0, 100)
    assert setup.reservations() == 20
    for store in stores:
        store.close()
    setup.close()


def test_shanghai_midnight_splits_days_in_budgets_and_reports(ledger_url):
    _write(ledger_url,
           dataclasses.replace(BASE, request_id="late", ts=LATE),
           dataclasses.replace(BASE, request_id="midnight", ts=MIDNIGHT, input_tokens=7,
                               billable_tokens=7))
    store = BudgetStore(ledger_url)
    budget = Budget("bj", None, "day", "tokens", 1000)
    store.put(budget)
    dec31, jan1 = _period("day", LATE), _period("day", MIDNIGHT)
    assert dec31.local_start.date() == dt.date(2026, 12, 31)
    assert jan1.local_start.date() == dt.date(2027, 1, 1)
    assert store.reconcile(budget, dec31).used == 10
    assert store.reconcile(budget, jan1).used == 7
    # A call starting at either instant reserves on its own day's counter.
    for at, rid in ((LATE, "c-late"), (MIDNIGHT, "c-midnight")):
        claim = Claim(budget, _period("day", at), 100)
        refused, after = store.reserve([claim], [], reservation_id=rid, request_id=rid,
                                       record_ts=at, expires_at=time.time() + 60,
                                       now=time.time())
        assert refused is None
    assert store.counter(budget, dec31).reserved == 100
    assert store.counter(budget, jan1).reserved == 100
    # The month of Shanghai: the first call is December's, the second January's.
    month = Budget("bj", None, "month", "requests", 5)
    assert store.reconcile(month, _period("month", LATE)).used == 1
    assert store.reconcile(month, _period("month", MIDNIGHT)).used == 1
    store.close()
    rows = build_report(LedgerReader(ledger_url), start="2026-12-31", end="2027-01-01",
                        period="day", by=(), tz="Asia/Shanghai", source="raw")
    assert {r["period"].isoformat(): r["billable_tokens"] for r in rows} == {
        "2026-12-31": 10, "2027-01-01": 7}


def test_an_unsettled_reservation_expires_and_reconcile_waits_for_it(ledger_url):
    store = BudgetStore(ledger_url)
    budget = Budget("bj", None, "month", "tokens", 1000)
    store.put(budget)
    period = _period("month", MIDNIGHT)
    store.reconcile(budget, period)
    now = time.time()
    # A call reserved 10, was billed (its record is in the ledger), and its process died
    # before settling: reconcile must not count it twice (used + reserved).
    refused, _ = store.reserve([Claim(budget, period, 10)], [], reservation_id="dead",
                               request_id="billed-then-killed", record_ts=MIDNIGHT,
                               expires_at=now + 2, now=now)
    assert refused is None
    _write(ledger_url, dataclasses.replace(BASE, request_id="billed-then-killed", ts=MIDNIGHT))
    counter = store.reconcile(budget, period)
    assert (counter.used, counter.reserved) == (0, 10)
    assert store.sweep_expired(now) == set()  # not yet expired
    assert store.sweep_expired(now + 3) == {budget.budget_id}
    assert store.reservations() == 0
    counter = store.reconcile(budget, period)
    assert (counter.used, counter.reserved) == (10, 0)
    # A live call settles: reservation 10 becomes the actual 8.
    store.reserve([Claim(budget, period, 10)], [], reservation_id="live", request_id="live",
                  record_ts=MIDNIGHT, expires_at=now + 60, now=now)
    after = store.settle("live", [(Claim(budget, period, 10), 8)])
    assert after[budget.budget_id][0].used == 18 and after[budget.budget_id][0].reserved == 0
    store.close()


def test_token_buckets_refill_and_say_when(ledger_url):
    store = BudgetStore(ledger_url)
    rpm = BucketTake("key1/rpm", 3.0, 3 / 60, 1.0, "requests_per_minute")
    now = 1_000_000.0
    answers = [store.reserve([], [rpm], reservation_id=f"b{i}", request_id=f"b{i}",
                             record_ts=MIDNIGHT, expires_at=now + 60, now=now)[0]
               for i in range(4)]
    assert answers[:3] == [None, None, None]
    assert answers[3] is not None and answers[3].retry_after_s == pytest.approx(20.0)
    # 20 s later one request is back, not two.
    later = [store.reserve([], [rpm], reservation_id=f"c{i}", request_id=f"c{i}",
                           record_ts=MIDNIGHT, expires_at=now + 60, now=now + 20)[0]
             for i in range(2)]
    assert later[0] is None and later[1] is not None
    store.close()


def test_reprice_moves_a_cost_budget(tmp_path, capsys):
    url = str(tmp_path / "ledger.sqlite3")
    now = normalize_ts(dt.datetime.now(dt.timezone.utc))
    _write(url, *(dataclasses.replace(BASE, request_id=f"p{i}", ts=now, input_tokens=1000,
                                      billable_tokens=1000, price_id="ernie-2026-01",
                                      cost="0.004000") for i in range(5)))
    assert cli_main(["budgets", "set", "--ledger", url, "--tenant", "bj", "--period", "month",
                     "--limit-cost", "1"]) == 0
    capsys.readouterr()
    store = BudgetStore(url)
    budget = store.load()[0]
    period = calendar_period("month", load_zone("UTC"), dt.datetime.now(dt.timezone.utc))
    assert store.reconcile(budget, period).used == 5 * 4000  # 0.004 CNY in micro-units
    dearer = tmp_path / "pricing.yaml"
    dearer.write_text(
        "currency: CNY\nmodels:\n  ernie:\n    - price_id: ernie-dear\n"
        "      effective_from: '2026-01-01'\n      per_1k_input_tokens: '0.0100'\n"
    )
    with contextlib.suppress(SystemExit):
        code = cli_main(["bill", "reprice", "--ledger", url, "--pricing", str(dearer),
                         "--from", "2000-01-01", "--to", "2100-01-01", "--reason", "test"])
    assert code == 0
    out = capsys.readouterr().out
    assert "changed 5" in out and "1 period counter(s) reconciled" in out
    assert store.counter(budget, period).used == 5 * 10_000
    store.close()


@pytest.mark.parametrize(("block", "message"), [
    ({"budgets": {"limits": [{"tenant": "fin", "period": "quarter", "limit_tokens": 5}]}},
     "budgets.limits[0].period: one of day, week, month, got 'quarter'"),
    ({"budgets": {"limits": [{"tenant": "fin", "period": "day"}]}},
     "budgets.limits[0]: give exactly one of limit_cost"),
    ({"budgets": {"limits": [{"tenant": "fin", "period": "day", "limit_cost": "1.0000001"}]}},
     "at most 6 decimals"),
    ({"budgets": {"limits": [{"tenant": "fin", "period": "day", "limit_tokens": 5,
                              "soft": 1.5}]}}, "0 < soft <= 1"),
    ({"budgets": {"limits": [{"tenant": "fin", "period": "day", "limit_tokens": 5}] * 2}},
     "the same budget twice"),
    ({"rate_limits": {"requests_per_minute": 0}}, "rate_limits.requests_per_minute"),
    ({"rate_limits": {"keys": {"abc": {"burst": 3}}}}, "rate_limits.keys.abc"),
])
def test_bad_budget_settings_fail_at_start_up_with_the_field_named(tmp_path, block, message):
    from serving.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=block)
