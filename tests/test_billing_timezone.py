"""Report periods in the company's own time zone (``billing.timezone`` / ``--tz`` / ``?tz=``).

Records placed one second either side of a local midnight must land in different local
days, on SQLite and PostgreSQL ledgers and from both report sources (per-minute rollups
and raw records): Asia/Shanghai (+08:00, whole hours: hour buckets), Asia/Kolkata (+05:30:
minute buckets) and America/New_York on the night its DST ended (offset changes inside
the range). Bare-date bounds are local midnights; CSV says the zone; an unknown zone is a
clear error in the CLI, the config and the usage API (a real uvicorn server).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from support.pg import temporary_database

from billing.cli import main as cli_main
from billing.report import build_report
from billing.usage_api import make_usage_router
from exporters.ledger import LedgerReader, open_ledger
from exporters.usage_record import UsageRecord
from serving.config import ConfigError, load_config

BASE = UsageRecord(
    request_id="", ts="", duration_ms=10.0, tenant="finance", api_key_id=None, model="ocr",
    model_version="1", operation="ocr", protocol="http", endpoint="/v2/models/ocr/infer",
    status="ok", output_tokens=0, characters=0, images=1, billable_tokens=0,
)
# (request id, UTC instant, characters): pairs one second either side of a local midnight.
RECORDS = [
    ("sh-2359", "2026-12-01T15:59:59+00:00", 100),  # 23:59:59 Dec 1 in Shanghai
    ("sh-0000", "2026-12-01T16:00:00+00:00", 200),  # 00:00:00 Dec 2 in Shanghai
    ("in-2359", "2026-12-05T18:29:59+00:00", 10),  # 23:59:59 Dec 5 in Kolkata
    ("in-0000", "2026-12-05T18:30:00+00:00", 20),  # 00:00:00 Dec 6 in Kolkata
    ("ny-2359", "2026-11-02T04:59:59+00:00", 1),  # 23:59:59 Nov 1 EST (DST ended 06:00Z)
    ("ny-0000", "2026-11-02T05:00:00+00:00", 2),  # 00:00:00 Nov 2 EST
    ("sh-newyear", "2026-12-31T16:00:00+00:00", 4000),  # 00:00 Jan 1 2027 in Shanghai
]


def _records() -> list[UsageRecord]:
    return [dataclasses.replace(BASE, request_id=rid, ts=ts, output_tokens=chars,
                                characters=chars, billable_tokens=chars, cost="0")
            for rid, ts, chars in RECORDS]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ledger(request, tmp_path_factory):
    if request.param == "sqlite":
        url = str(tmp_path_factory.mktemp("tz") / "ledger.sqlite3")
        sink = open_ledger(url)
        sink.write_batch(_records())
        sink.shutdown()
        yield url
        return
    with temporary_database("pm_tz") as url:
        sink = open_ledger(url)
        sink.write_batch(_records())
        sink.shutdown()
        yield url


def _days(url: str, tz: str, start: str, end: str, source: str, period: str = "day"):
    rows = build_report(LedgerReader(url), start=start, end=end, period=period, by=(),
                        tz=tz, source=source)
    assert {row["timezone"] for row in rows} <= {tz}
    return {row["period"].isoformat(): row["characters"] for row in rows}


@pytest.mark.parametrize("source", ["rollup", "raw"])
def test_one_second_either_side_of_a_local_midnight_is_two_days(ledger, source):
    assert _days(ledger, "Asia/Shanghai", "2026-12-01", "2026-12-02", source) == {
        "2026-12-01": 100, "2026-12-02": 200}
    # The same two calls are one UTC day.
    assert _days(ledger, "UTC", "2026-12-01", "2026-12-01", source) == {"2026-12-01": 300}
    assert _days(ledger, "Asia/Kolkata", "2026-12-05", "2026-12-06", source) == {
        "2026-12-05": 10, "2026-12-06": 20}
    assert _days(ledger, "America/New_York", "2026-11-01", "2026-11-02", source) == {
        "2026-11-01": 1, "2026-11-02": 2}


@pytest.mark.parametrize("source", ["rollup", "raw"])
def test_bare_dates_are_local_midnights_and_months_are_local(ledger, source):
    # 2026-12-02 in Shanghai is 2026-12-01T16:00Z .. 2026-12-02T16:00Z: only sh-0000.
    assert _days(ledger, "Asia/Shanghai", "2026-12-02", "2026-12-02", source) == {
        "2026-12-02": 200}
    months = _days(ledger, "Asia/Shanghai", "2026-11-01", "2027-01-31", source, "month")
    assert months == {"2026-11-01": 3, "2026-12-01": 330, "2027-01-01": 4000}
    utc_months = _days(ledger, "UTC", "2026-11-01", "2027-01-31", source, "month")
    assert utc_months == {"2026-11-01": 3, "2026-12-01": 4330}
    # A timestamp bound with an offset keeps its instant, whatever the zone.
    assert _days(ledger, "Asia/Shanghai", "2026-12-01T16:00:00Z", "2026-12-01T16:01:00Z",
                 source) == {"2026-12-02": 200}


def test_cli_report_in_a_zone_says_which_zone(ledger, tmp_path, capsys):
    out = tmp_path / "beijing.csv"
    args = ["report", "--ledger", ledger, "--from", "2026-12-01", "--to", "2026-12-02",
            "--by", "tenant", "--tz", "Asia/Shanghai"]
    assert cli_main([*args, "--format", "csv", "-o", str(out)]) == 0
    with open(out, encoding="utf-8-sig", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["period"], r["timezone"], r["characters"]) for r in table] == [
        ("2026-12-01", "Asia/Shanghai", "100"), ("2026-12-02", "Asia/Shanghai", "200")]
    assert cli_main([*args[:-1], "Mars/Olympus", "--format", "json"]) == 2
    assert "unknown time zone 'Mars/Olympus'" in capsys.readouterr().err


def test_config_refuses_an_unknown_zone_and_normalises_a_known_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("billing: {timezone: Asia/Beijing}\n")
    with pytest.raises(ConfigError, match="billing.timezone: unknown time zone 'Asia/Beijing'"):
        load_config(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("billing: {timezone: ' Asia/Shanghai '}\n")
    assert load_config(str(good))["billing"]["timezone"] == "Asia/Shanghai"
    assert load_config(None)["billing"]["timezone"] == "UTC"


@pytest.fixture(scope="module")
def usage_api(ledger):
    app = FastAPI()
    reader = LedgerReader(ledger)
    app.include_router(make_usage_router(lambda: reader, timezone="Asia/Shanghai"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def test_usage_api_groups_by_the_configured_zone_and_tz_overrides(usage_api):
    params = {"from": "2026-12-01", "to": "2026-12-02", "by": "tenant"}
    beijing = httpx.get(f"{usage_api}/v1/usage", params=params, timeout=30).json()
    assert beijing["timezone"] == "Asia/Shanghai"
    assert [(r["period"], r["characters"]) for r in beijing["rows"]] == [
        ("2026-12-01", 100), ("2026-12-02", 200)]
    utc = httpx.get(f"{usage_api}/v1/usage", params={**params, "tz": "UTC"}, timeout=30)
    assert [(r["period"], r["characters"]) for r in utc.json()["rows"]] == [
        ("2026-12-01", 300)]
    bad = httpx.get(f"{usage_api}/v1/usage", params={**params, "tz": "Mars/Olympus"},
                    timeout=30)
    assert bad.status_code == 400 and "unknown time zone" in bad.json()["detail"]
    assert dt.date.fromisoformat(beijing["rows"][0]["period"])  # ISO dates
