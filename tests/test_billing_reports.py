"""Reports, exports, repricing and the CLI on a small hand-checked fixture.

tests/fixtures/billing/records.jsonl holds 8 requests over 2026-03-01..09; its price
table changes the OCR price at 2026-03-02 12:00 UTC. Every expected figure below was
computed by hand from those two files (see the comments).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import openpyxl
import pandas as pd
import pyarrow.parquet as pq
import pytest

from billing.cli import main as cli_main
from billing.export import export_records
from billing.pricing import PriceBook
from billing.report import build_report
from billing.reprice import reprice
from exporters.ledger import LedgerReader, open_ledger
from exporters.usage_record import UsageRecord

FIX = Path(__file__).parent / "fixtures" / "billing"
D = Decimal

# Per-record costs: ocr-v1 = 0.02/1K out + 0.001/image; ocr-v2 = 0.03/1K + 0.001;
# ernie = 0.004/1K in; failed requests cost 0.
COSTS = {
    "r1": ("ocr-v1", "0.021000"),  # 1000 chars
    "r2": ("ocr-v1", "0.011000"),  # 500 chars
    "r3": ("ernie-v1", "0.001000"),  # 250 tokens
    "r4": ("ocr-v1", "0.000000"),  # INTERNAL error
    "r5": ("ocr-v1", "0.041000"),  # 11:59:59, just before the change
    "r6": ("ocr-v2", "0.061000"),  # 12:00:00, the change applies
    "r7": ("ernie-v1", "0.005000"),  # 1250 tokens
    "r8": ("ocr-v2", "0.010990"),  # 333 chars
}
# (period, tenant, model): requests, errors, in, out, chars, images, pages, billable, cost,
# tokens/request, cost/request
DAY = [
    ("2026-03-01", "acme", "ernie", 1, 0, 250, 0, 0, 0, 0, 250, "0.00", "250.00", "0.001000"),
    ("2026-03-01", "acme", "ocr", 2, 0, 0, 1500, 1500, 2, 2, 1500, "0.03", "750.00", "0.016000"),
    ("2026-03-01", "beta", "ocr", 1, 1, 0, 0, 0, 1, 1, 0, "0.00", "0.00", "0.000000"),
    # 0.005 rounds half up to 0.01
    ("2026-03-02", "acme", "ernie", 1, 0, 1250, 0, 0, 0, 0, 1250, "0.01", "1250.00", "0.005000"),
    ("2026-03-02", "beta", "ocr", 2, 0, 0, 4000, 4000, 2, 2, 4000, "0.10", "2000.00", "0.051000"),
    ("2026-03-09", "acme", "ocr", 1, 0, 0, 333, 333, 1, 1, 333, "0.01", "333.00", "0.010990"),
]
NAMES = ("requests", "errors", "input_tokens", "output_tokens", "characters", "images",
         "pages", "billable_tokens", "cost", "tokens_per_request", "cost_per_request")
# month by tenant: acme r1 r2 r3 r7 r8 = 0.04899 -> 0.05, (1500 + 1833) / 5 = 666.60
MONTH = [
    ("2026-03-01", "acme", 5, 0, 1500, 1833, 1833, 3, 3, 3333, "0.05", "666.60", "0.009798"),
    ("2026-03-01", "beta", 3, 1, 0, 4000, 4000, 3, 3, 4000, "0.10", "1333.33", "0.034000"),
]


def _expected(table, dims):
    out = []
    for row in table:
        d = {"period": dt.date.fromisoformat(row[0]), "timezone": "UTC"}
        d.update(zip(dims, row[1:1 + len(dims)], strict=True))
        for name, value in zip(NAMES, row[1 + len(dims):], strict=True):
            d[name] = D(value) if isinstance(value, str) else value
        out.append(d)
    return out


def _records(book: PriceBook) -> list[UsageRecord]:
    recs = []
    for line in (FIX / "records.jsonl").read_text().splitlines():
        rec = UsageRecord(**json.loads(line))
        rec.price_id, rec.cost = book.price(rec)
        recs.append(rec)
    return recs


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bill") / "ledger.db")
    book = PriceBook.load(str(FIX / "pricing.yaml"))
    recs = _records(book)
    assert {r.request_id: (r.price_id, r.cost) for r in recs} == COSTS
    sink = open_ledger(path)
    sink.write_batch(recs)
    sink.shutdown()
    return path


@pytest.mark.parametrize("source", ["rollup", "raw"])
def test_day_and_month_reports_match_hand_figures(ledger, source):
    reader = LedgerReader(ledger)
    day = build_report(reader, start="2026-03-01", end="2026-03-31", source=source)
    assert day == _expected(DAY, ("tenant", "model"))
    month = build_report(reader, start="2026-03-01", end="2026-03-31", period="month",
                         by="tenant", source=source)
    assert month == _expected(MONTH, ("tenant",))
    week = build_report(reader, start="2026-03-01", end="2026-03-31", period="week",
                        by="", source=source)
    # 2026-03-01 is a Sunday: ISO weeks start 02-23 (r1-r4), 03-02 (r5-r7), 03-09 (r8)
    assert [(r["period"].isoformat(), r["requests"], r["cost"]) for r in week] == [
        ("2026-02-23", 4, D("0.03")), ("2026-03-02", 3, D("0.11")),
        ("2026-03-09", 1, D("0.01"))]
    one = build_report(reader, start="2026-03-02T12:00:00Z", end="2026-03-02T12:01:00Z",
                       by="tenant", tenant="beta", source=source)
    assert [(r["requests"], r["cost"]) for r in one] == [(1, D("0.06"))]


def test_report_formats_table_csv_json_xlsx(ledger, tmp_path, capsys):
    args = ["report", "--ledger", ledger, "--from", "2026-03-01", "--to", "2026-03-31"]
    assert cli_main(args + ["--format", "json", "-o", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert rows[4] == {"period": "2026-03-02", "timezone": "UTC", "tenant": "beta", "model": "ocr",
                       "requests": 2, "errors": 0, "input_tokens": 0, "output_tokens": 4000,
                       "characters": 4000, "images": 2, "pages": 2, "billable_tokens": 4000,
                       "cost": "0.10", "tokens_per_request": "2000.00",
                       "cost_per_request": "0.051000"}
    assert cli_main(args + ["--format", "csv", "-o", str(tmp_path / "r.csv")]) == 0
    raw = (tmp_path / "r.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # BOM: Excel opens it as UTF-8
    with open(tmp_path / "r.csv", encoding="utf-8-sig", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["period", "timezone", "tenant", "model", *NAMES]
    assert [tuple(r) for r in table[1:]] == [
        tuple(str(v) for v in (r[0], "UTC", *r[1:])) for r in DAY]
    assert cli_main(args + ["--format", "xlsx", "-o", str(tmp_path / "r.xlsx"),
                            "--chart", str(tmp_path / "c.png")]) == 0
    ws = openpyxl.load_workbook(tmp_path / "r.xlsx").active
    cells = list(ws.iter_rows(values_only=True))
    assert cells[1][0] == dt.datetime(2026, 3, 1)  # a real date, not text
    assert cells[2][1] == "UTC"
    assert cells[2][4:] == (2, 0, 0, 1500, 1500, 2, 2, 1500, 0.03, 750.0, 0.016)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(args + ["--format", "table", "--by", "tenant", "--period", "month"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["period", "timezone", "tenant", *NAMES]
    assert out[2].split() == ["2026-03-01", "UTC", "acme", "5", "0", "1500", "1833", "1833", "3",
                              "3", "3333", "0.05", "666.60", "0.009798"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "xlsx"])
def test_exports(ledger, tmp_path, fmt):
    out = str(tmp_path / f"e.{fmt}")
    n = export_records(LedgerReader(ledger), start="2026-03-01", end="2026-03-01", fmt=fmt,
                       path=out, tenant="acme")
    assert n == 3  # a bare-date end includes that day: r1 r2 r3, not r7 (03-02)
    if fmt == "parquet":
        t = pq.read_table(out)
        assert t.column("request_id").to_pylist() == ["r1", "r2", "r3"]
        assert t.column("cost").to_pylist() == [D("0.021"), D("0.011"), D("0.001")]
        assert str(t.schema.field("ts").type) == "timestamp[us, tz=UTC]"
    elif fmt == "xlsx":
        rows = list(openpyxl.load_workbook(out).active.iter_rows(values_only=True))
        assert rows[1][1] == dt.datetime(2026, 3, 1, 8, 0) and rows[1][13] == 1000
    elif fmt == "csv":
        assert Path(out).read_bytes().startswith(b"\xef\xbb\xbf")
        with open(out, encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
        assert rows[0]["ts"] == "2026-03-01 08:00:00.000000" and rows[0]["cost"] == "0.021000"
    else:
        first = json.loads(Path(out).read_text().splitlines()[0])
        assert first["timestamp"] == "2026-03-01T08:00:00.000000+00:00"
        assert first["token_count"] == 1000 and first["image"]


def test_pandas_seed_script_matches_daily_report(ledger, tmp_path):
    out = str(tmp_path / "all.jsonl")
    export_records(LedgerReader(ledger), start="2026-03-01", end="2026-03-31", fmt="jsonl",
                   path=out)
    df = pd.read_json(out, lines=True)  # the simple per-call log script
    df["date"] = pd.to_datetime(df["timestamp"]).dt.date
    daily = df.groupby("date").agg(tokens=("token_count", "sum"), images=("image", "count"))
    report = build_report(LedgerReader(ledger), start="2026-03-01", end="2026-03-31", by=())
    assert {r["period"]: (r["billable_tokens"], r["images"]) for r in report} == {
        d: (int(v.tokens), int(v.images)) for d, v in daily.iterrows()}


def test_reprice_after_price_change_with_audit(tmp_path):
    path = str(tmp_path / "ledger.db")
    full = PriceBook.load(str(FIX / "pricing.yaml"))
    old_book = PriceBook.from_dict({"models": {
        "ocr": [{"price_id": "ocr-v1", "effective_from": "2026-03-01",
                 "per_1k_output_tokens": "0.02", "per_image": "0.001"}],
        "ernie": [{"price_id": "ernie-v1", "effective_from": "2026-03-01",
                   "per_1k_input_tokens": "0.004"}]}})
    sink = open_ledger(path)
    sink.write_batch(_records(old_book))
    sink.shutdown()
    reader = LedgerReader(path)
    before = build_report(reader, start="2026-03-01", end="2026-03-31", by="tenant",
                          period="month")
    assert [r["cost"] for r in before] == [D("0.05"), D("0.08")]  # beta: 0.041 + 0.041
    (tmp_path / "p.yaml").write_text((FIX / "pricing.yaml").read_text())
    rc = cli_main(["bill", "reprice", "--ledger", path, "--pricing", str(tmp_path / "p.yaml"),
                   "--from", "2026-03-01", "--to", "2026-03-31", "--reason", "v2 price",
                   "--by", "auditor"])
    assert rc == 0
    for source in ("rollup", "raw"):
        after = build_report(reader, start="2026-03-01", end="2026-03-31", period="month",
                             by="tenant", source=source)
        assert after == _expected(MONTH, ("tenant",))
    audit = reader.fetch_all("SELECT request_id, changed_by, reason, old_price_id, old_cost, "
                             "new_price_id, new_cost FROM bill_audit ORDER BY request_id")
    assert audit == [("r6", "auditor", "v2 price", "ocr-v1", "0.041000", "ocr-v2", "0.061000"),
                     ("r8", "auditor", "v2 price", "ocr-v1", "0.007660", "ocr-v2", "0.010990")]
    again = reprice(reader, full, start="2026-03-01", end="2026-03-31")
    assert again.changed == 0 and again.new_total == D("0.150990")


def test_pricing_and_cli_errors_are_clear(tmp_path, ledger):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  ocr:\n    - price_id: x\n      effective_from: 2026-01-01\n"
                   "      per_1k_tokens: '1'\n")
    with pytest.raises(ValueError, match="unknown key"):
        PriceBook.load(str(bad))
    with pytest.raises(ValueError, match="bad date"):
        build_report(LedgerReader(ledger), start="March", end="2026-03-31")
    with pytest.raises(ValueError, match="cannot group by"):
        build_report(LedgerReader(ledger), start="2026-03-01", end="2026-03-31", by="colour")
    proc = subprocess.run([sys.executable, "-m", "billing.cli", "report", "--ledger",
                           str(tmp_path / "missing.db"), "--from", "2026-03-01", "--to",
                           "2026-03-02"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 2 and "no ledger database" in proc.stderr


def test_reprice_and_reports_are_per_tenant_and_per_attempt(tmp_path):
    """One request id used by two tenants, and by one tenant for two failed attempts and
    the ok retry: five records; reports count each as a request (failed attempts carry 0
    billable tokens; this price table charges them per image), reprice updates each
    record on its own and audits it with tenant and attempt."""
    path = str(tmp_path / "ledger.db")
    old = PriceBook.from_dict({"charge_failed_requests": True, "models": {"ocr": [
        {"price_id": "ocr-v1", "effective_from": "2026-03-01", "per_image": "0.001"}]}})
    new = PriceBook.from_dict({"charge_failed_requests": True, "models": {"ocr": [
        {"price_id": "ocr-v2", "effective_from": "2026-03-01", "per_image": "0.002"}]}})
    recs = []
    for tenant, status, span, out in (("acme", "UNAVAILABLE", "s1", 0),
                                      ("acme", "DEADLINE_EXCEEDED", "s2", 0),
                                      ("acme", "ok", "s3", 400), ("beta", "ok", "s4", 100),
                                      ("beta", "INTERNAL", "s5", 0)):
        rec = UsageRecord(request_id="same-id", ts="2026-03-01T08:00:00+00:00",
                          duration_ms=1.0, tenant=tenant, api_key_id=None, model="ocr",
                          model_version="1", operation="ocr", protocol="http", endpoint="/x",
                          status=status, output_tokens=out, billable_tokens=out, images=1,
                          span_id=span)
        rec.price_id, rec.cost = old.price(rec)
        recs.append(rec)
    sink = open_ledger(path)
    assert all(o.inserted for o in sink.write_batch(recs))
    sink.shutdown()
    reader = LedgerReader(path)
    for source in ("rollup", "raw"):
        rows = build_report(reader, start="2026-03-01", end="2026-03-01", by="tenant",
                            source=source)
        assert [(r["tenant"], r["requests"], r["errors"], r["billable_tokens"])
                for r in rows] == [("acme", 3, 2, 400), ("beta", 2, 1, 100)]
    result = reprice(reader, new, start="2026-03-01", end="2026-03-01", changed_by="t")
    assert (result.examined, result.changed) == (5, 5)
    assert (result.old_total, result.new_total) == (D("0.005"), D("0.010"))
    audit = reader.fetch_all("SELECT tenant, request_id, attempt, old_cost, new_cost "
                             "FROM bill_audit ORDER BY tenant, attempt")
    assert audit == [
        ("acme", "same-id", "", "0.001000", "0.002000"),
        ("acme", "same-id", "s1", "0.001000", "0.002000"),
        ("acme", "same-id", "s2", "0.001000", "0.002000"),
        ("beta", "same-id", "", "0.001000", "0.002000"),
        ("beta", "same-id", "s5", "0.001000", "0.002000"),
    ]
    for source in ("rollup", "raw"):
        rows = build_report(reader, start="2026-03-01", end="2026-03-01", by="tenant",
                            source=source)
        assert [(r["tenant"], r["cost_per_request"]) for r in rows] == [
            ("acme", D("0.002000")), ("beta", D("0.002000"))]
    out = tmp_path / "export.jsonl"
    assert export_records(reader, start="2026-03-01", end="2026-03-01", fmt="jsonl",
                          path=str(out), progress=False) == 5
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["tenant"], x["span_id"], x["cost"]) for x in lines] == [
        ("acme", "s3", "0.002000"), ("acme", "s1", "0.002000"), ("acme", "s2", "0.002000"),
        ("beta", "s4", "0.002000"), ("beta", "s5", "0.002000")]
