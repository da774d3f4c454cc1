"""``bill export``: stream ledger records of a period to jsonl / csv / parquet / xlsx.

Memory stays flat on millions of rows: rows come through a server-side cursor
(PostgreSQL) or ``fetchmany`` (SQLite); parquet is written in row groups with
``pyarrow.parquet.ParquetWriter``; xlsx through openpyxl's write-only mode. A tqdm bar
on stderr shows progress. JSONL lines are ``UsageRecord.to_jsonl_dict()`` (with the
seed-compatible ``timestamp``/``image``/``token_count``); CSV is UTF-8 with BOM, ``ts``
as ``YYYY-MM-DD HH:MM:SS.ffffff`` UTC (a form Excel and Power BI read as a date-time).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from billing.output import private_output
from billing.report import parse_bound
from exporters.ledger.reader import LedgerReader
from exporters.ledger.schema import ATTEMPT_SQL, RAW_COLUMNS, USAGE_COUNTS, row_to_record
from exporters.usage_record import LEDGER_COLUMNS, UsageRecord

__all__ = ["EXPORT_FORMATS", "export_records", "iter_records"]

EXPORT_FORMATS = ("jsonl", "csv", "parquet", "xlsx")
_XLSX_MAX_ROWS = 1_048_575  # Excel's sheet limit minus the header
_ROW_GROUP = 100_000
_INT = frozenset(USAGE_COUNTS)


def _where(tenant: str | None, model: str | None) -> str:
    where = "ts >= ? AND ts < ?"
    if tenant is not None:
        where += " AND tenant = ?"
    if model is not None:
        where += " AND model = ?"
    return where


def _params(start: str, end: str, tenant: str | None, model: str | None) -> tuple[Any, ...]:
    return (
        parse_bound(start),
        parse_bound(end, end=True),
        *(v for v in (tenant, model) if v is not None),
    )


def iter_records(
    reader: LedgerReader,
    *,
    start: str,
    end: str,
    tenant: str | None = None,
    model: str | None = None,
) -> Iterator[UsageRecord]:
    """Records of the period in (ts, tenant, request_id, attempt) order, streamed.

    Every row is exported: one ok (billed) record per (tenant, request_id) and each
    failed attempt as its own record (status says which).
    """
    query = (
        f"SELECT {', '.join(RAW_COLUMNS)} FROM usage_records "
        f"WHERE {_where(tenant, model)} ORDER BY ts, tenant, request_id, {ATTEMPT_SQL}"
    )
    for row in reader.iter_rows(query, _params(start, end, tenant, model)):
        yield row_to_record(row)


def export_records(
    reader: LedgerReader,
    *,
    start: str,
    end: str,
    fmt: str,
    path: str,
    tenant: str | None = None,
    model: str | None = None,
    progress: bool = True,
) -> int:
    """Write the period's records to ``path`` (mode 0600, replaced atomically) as ``fmt``;
    returns the number written."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, not {fmt!r}")
    (total,) = reader.fetch_all(
        f"SELECT COUNT(*) FROM usage_records WHERE {_where(tenant, model)}",
        _params(start, end, tenant, model),
    )[0]
    total = int(total)
    if fmt == "xlsx" and total > _XLSX_MAX_ROWS:
        raise ValueError(
            f"{total} records exceed an xlsx sheet ({_XLSX_MAX_ROWS} rows); export csv or parquet"
        )
    from tqdm import tqdm

    records = iter_records(reader, start=start, end=end, tenant=tenant, model=model)
    with tqdm(
        total=total, unit="rec", disable=not progress or total < 10_000, desc=f"export {fmt}"
    ) as bar:
        writer = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet, "xlsx": _xlsx}[fmt]
        # 0600, complete or absent: a bill export is as private as the ledger
        with private_output(path) as tmp:
            return writer(records, tmp, bar)


def _jsonl(records: Iterator[UsageRecord], path: str, bar: Any) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_jsonl_dict(), ensure_ascii=False) + "\n")
            n += 1
            bar.update(1)
    return n


def _excel_ts(ts: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(ts).replace(tzinfo=None)


def _csv(records: Iterator[UsageRecord], path: str, bar: Any) -> int:
    n = 0
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(LEDGER_COLUMNS)
        for rec in records:
            row = rec.to_dict()
            row["ts"] = _excel_ts(rec.ts).strftime("%Y-%m-%d %H:%M:%S.%f")
            row["truncated"] = int(rec.truncated)
            writer.writerow(["" if row[c] is None else row[c] for c in LEDGER_COLUMNS])
            n += 1
            bar.update(1)
    return n


def _arrow_schema() -> Any:
    import pyarrow as pa

    fields = []
    for c in LEDGER_COLUMNS:
        if c == "ts":
            t = pa.timestamp("us", tz="UTC")
        elif c == "duration_ms":
            t = pa.float64()
        elif c in _INT:
            t = pa.int64()
        elif c == "truncated":
            t = pa.bool_()
        elif c == "cost":
            t = pa.decimal128(18, 6)
        else:
            t = pa.string()
        fields.append(pa.field(c, t))
    return pa.schema(fields)


def _parquet(records: Iterator[UsageRecord], path: str, bar: Any) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _arrow_schema()
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        cols: dict[str, list[Any]] = {c: [] for c in LEDGER_COLUMNS}

        def flush() -> None:
            if cols["request_id"]:
                writer.write_table(pa.Table.from_pydict(cols, schema=schema))
                for v in cols.values():
                    v.clear()

        for rec in records:
            row = rec.to_dict()
            row["ts"] = _dt.datetime.fromisoformat(rec.ts)
            row["cost"] = Decimal(rec.cost) if rec.cost else None
            for c in LEDGER_COLUMNS:
                cols[c].append(row[c])
            n += 1
            bar.update(1)
            if len(cols["request_id"]) >= _ROW_GROUP:
                flush()
        flush()
    return n


def _xlsx(records: Iterator[UsageRecord], path: str, bar: Any) -> int:
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell

    wb = Workbook(write_only=True)
    ws = wb.create_sheet("usage")
    ws.append(list(LEDGER_COLUMNS))
    n = 0
    for rec in records:
        row = rec.to_dict()
        cells = []
        for c in LEDGER_COLUMNS:
            value = row[c]
            if c == "ts":
                cell = WriteOnlyCell(ws, value=_excel_ts(rec.ts))
                cell.number_format = "yyyy-mm-dd hh:mm:ss.000"
            elif c == "cost":
                cell = WriteOnlyCell(ws, value=float(Decimal(value)) if value else None)
                cell.number_format = "0.000000"
            else:
                cell = WriteOnlyCell(ws, value=value)
            cells.append(cell)
        ws.append(cells)
        n += 1
        bar.update(1)
    wb.save(path)
    return n
