"""Report writers: table / csv / xlsx / json, and the token & cost trend chart.

Everything opens as is in Excel and Power BI: CSV is UTF-8 with a BOM (Excel otherwise
guesses the ANSI code page and mangles tenant names), dates are written as real dates in
xlsx and as ``YYYY-MM-DD`` in CSV, and numbers as numbers (cost too: already rounded to
0.01, so a float shows the same figure). JSON keeps cost as a decimal string, like the
ledger's ``cost`` column, so no consumer sees binary rounding.

Bills are as private as the ledger: every file written here and by billing/export.py goes
through :func:`private_output`, created 0600 under a temporary name and renamed over the
target only when complete (never a world-readable or half-written bill).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any, TextIO

__all__ = [
    "FORMATS",
    "private_output",
    "report_columns",
    "report_to_json",
    "write_chart",
    "write_report",
]


@contextlib.contextmanager
def private_output(path: str) -> Iterator[str]:
    """Yield a fresh 0600 file path next to ``path``; on success fsync it and atomically
    replace ``path`` with it (an existing file's loose mode goes with the old inode). On an
    exception the partial file is removed and ``path`` is left as it was."""
    target = os.path.abspath(path)
    tmp = os.path.join(
        os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.tmp"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask
    os.close(fd)
    try:
        yield tmp  # writers reopen it by name: the mode of an existing file is kept
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


FORMATS = ("table", "csv", "xlsx", "json")


def report_columns(rows: Sequence[dict[str, Any]], by: Sequence[str]) -> list[str]:
    from billing.report import METRICS

    return ["period", "timezone", *by, *METRICS]


def _plain(value: Any) -> Any:
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def report_to_json(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON-safe rows: dates ISO text, Decimals as strings."""
    return [{k: _plain(v) for k, v in row.items()} for row in rows]


def write_report(
    rows: Sequence[dict[str, Any]],
    by: Sequence[str],
    fmt: str,
    out: str | None,
    *,
    stdout: TextIO | None = None,
) -> None:
    """Write ``rows`` as ``fmt`` to the file ``out`` (or ``stdout`` for text formats)."""
    cols = report_columns(rows, by)
    if fmt == "xlsx":
        if not out:
            raise ValueError("xlsx output needs -o FILE")
        with private_output(out) as tmp:
            _write_xlsx(rows, cols, tmp)
        return
    buf = io.StringIO(newline="")
    if fmt == "json":
        json.dump(report_to_json(rows), buf, ensure_ascii=False, indent=2)
        buf.write("\n")
    elif fmt == "csv":
        writer = csv.writer(buf, lineterminator="\r\n")
        writer.writerow(cols)
        for row in rows:
            writer.writerow([_plain(row.get(c)) for c in cols])
    elif fmt == "table":
        buf.write(_table(rows, cols))
    else:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    text = buf.getvalue()
    if out:
        # utf-8-sig: the BOM lets Excel open the CSV as UTF-8.
        encoding = "utf-8-sig" if fmt == "csv" else "utf-8"
        with private_output(out) as tmp, open(tmp, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
    else:
        (stdout or __import__("sys").stdout).write(text)


def _table(rows: Sequence[dict[str, Any]], cols: list[str]) -> str:
    cells = [cols] + [[str(_plain(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = []
    for n, line in enumerate(cells):
        lines.append(
            "  ".join(
                v.ljust(w) if i <= 0 or not _numeric(v) else v.rjust(w)
                for i, (v, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _numeric(text: str) -> bool:
    try:
        Decimal(text)
    except ArithmeticError:
        return False
    return True


def _write_xlsx(rows: Sequence[dict[str, Any]], cols: list[str], path: str) -> None:
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell

    wb = Workbook(write_only=True)
    ws = wb.create_sheet("report")
    ws.append(cols)
    for row in rows:
        cells = []
        for c in cols:
            value = row.get(c)
            if isinstance(value, Decimal):
                value = float(value)
            cell = WriteOnlyCell(ws, value=value)
            if c == "period":
                cell.number_format = "yyyy-mm-dd"
            elif c == "cost":
                cell.number_format = "0.00"
            elif c == "cost_per_request":
                cell.number_format = "0.000000"
            cells.append(cell)
        ws.append(cells)
    wb.save(path)


def write_chart(rows: Sequence[dict[str, Any]], path: str) -> None:
    """PNG with two panels: billable tokens and cost per period, one line per tenant."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt

    series: dict[str, dict[_dt.date, list[float]]] = {}
    for row in rows:
        per = series.setdefault(str(row.get("tenant", "all")), {})
        slot = per.setdefault(row["period"], [0.0, 0.0])
        slot[0] += row["input_tokens"] + row["output_tokens"]
        slot[1] += float(row["cost"])
    fig, (ax_tok, ax_cost) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for tenant, points in sorted(series.items()):
        xs = sorted(points)
        ax_tok.plot(xs, [points[x][0] for x in xs], marker="o", label=tenant)
        ax_cost.plot(xs, [points[x][1] for x in xs], marker="o", label=tenant)
    ax_tok.set_ylabel("tokens (in + out)")
    ax_cost.set_ylabel("cost")
    ax_tok.set_title("Usage trend per tenant")
    ax_tok.legend(loc="best", fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    try:
        with private_output(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
