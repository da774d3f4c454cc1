"""Billing commands for the ``paddle-meter`` CLI: ``bill export``, ``bill reprice``, ``report``,
``ledger status``.

The server's CLI calls :func:`add_subcommands` with its subparsers and may supply the
configured ledger URL / pricing file with ``parser.set_defaults(ledger=..., pricing=...)``
(our options use ``argparse.SUPPRESS`` so such defaults survive); ``--ledger`` given
explicitly wins. Each subcommand sets ``func``: call ``args.func(args)`` -> exit code.
``python -m billing.cli ...`` runs the same commands standalone. Nothing printed (results
or errors) carries a DSN password: ledger locations and messages go through redact_dsn.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

__all__ = ["add_subcommands", "main"]

DEFAULT_PRICING = os.environ.get("PADDLE_METER_PRICING", "config/pricing.yaml")


def _common(p: argparse.ArgumentParser, *, period_required: bool = True) -> None:
    p.add_argument(
        "--ledger",
        default=argparse.SUPPRESS,
        help="ledger path or URL (sqlite:///..., postgresql://...); default: the configured ledger",
    )
    p.add_argument(
        "--from",
        dest="start",
        required=period_required,
        help="start, YYYY-MM-DD or ISO-8601 (inclusive); UTC (report: in --tz)",
    )
    p.add_argument(
        "--to",
        dest="end",
        required=period_required,
        help="end (exclusive; a bare date includes that day); UTC (report: in --tz)",
    )


def add_subcommands(
    subparsers: Any, *, default_ledger: str | None = None, default_timezone: str = "UTC",
    trace_url_template: str | None = None,
) -> None:
    """Register ``bill export``, ``bill reprice``, ``bill show`` and ``report`` on an
    argparse subparsers."""
    bill = subparsers.add_parser("bill", help="bill exports, repricing, one request's record")
    bill_sub = bill.add_subparsers(dest="bill_command", required=True)

    show = bill_sub.add_parser("show", help="a request's ledger record(s) and a link to its trace")
    show.add_argument("request_id")
    show.add_argument("--tenant", help="only this tenant's (ids are per tenant)")
    show.add_argument("--ledger", default=argparse.SUPPRESS,
                      help="ledger path or URL; default: the configured ledger")
    show.set_defaults(func=_cmd_show, _default_ledger=default_ledger,
                      _trace_url_template=trace_url_template)

    exp = bill_sub.add_parser("export", help="export ledger records of a period")
    _common(exp)
    exp.add_argument("--tenant")
    exp.add_argument("--model")
    exp.add_argument("--format", choices=("jsonl", "csv", "parquet", "xlsx"), default="jsonl")
    exp.add_argument("-o", "--output", required=True, help="output file")
    exp.add_argument("--no-progress", action="store_true")
    exp.set_defaults(func=_cmd_export, _default_ledger=default_ledger)

    rep = bill_sub.add_parser("reprice", help="re-rate a period with the current price table")
    _common(rep)
    rep.add_argument(
        "--pricing", default=argparse.SUPPRESS, help=f"price table YAML (default {DEFAULT_PRICING})"
    )
    rep.add_argument("--reason", help="why (kept in the audit table)")
    rep.add_argument("--by", dest="changed_by", help="who (default: the OS user)")
    rep.add_argument("--dry-run", action="store_true")
    rep.set_defaults(func=_cmd_reprice, _default_ledger=default_ledger,
                     _budget_timezone=default_timezone)

    report = subparsers.add_parser("report", help="usage and cost report")
    _common(report)
    report.add_argument("--period", choices=("day", "week", "month"), default="day")
    report.add_argument(
        "--tz",
        default=default_timezone,
        help="time zone of the periods and of bare --from/--to dates (IANA name; default "
        f"billing.timezone: {default_timezone})",
    )
    report.add_argument(
        "--by",
        default="tenant,model",
        help="comma list of tenant, model, operation ('' for totals)",
    )
    report.add_argument("--tenant")
    report.add_argument("--model")
    report.add_argument("--format", choices=("table", "csv", "xlsx", "json"), default="table")
    report.add_argument("-o", "--output", help="output file (stdout if omitted)")
    report.add_argument("--chart", help="also write a PNG trend chart here")
    report.add_argument(
        "--source", choices=("rollup", "raw"), default="rollup", help=argparse.SUPPRESS
    )
    report.set_defaults(func=_cmd_report, _default_ledger=default_ledger)

    ledger = subparsers.add_parser("ledger", help="ledger maintenance")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    status = ledger_sub.add_parser(
        "status",
        help="records, schema version, replays, spool, quarantine and conflicts of the ledger "
        "(password redacted)",
    )
    status.add_argument(
        "--ledger",
        default=argparse.SUPPRESS,
        help="ledger path or URL; default: the configured ledger",
    )
    status.add_argument(
        "--spool-dir",
        default=argparse.SUPPRESS,
        help="spool dir (default: the data dir's ledger.spool)",
    )
    status.set_defaults(func=_cmd_ledger_status, _default_ledger=default_ledger)


def _reader(args: argparse.Namespace) -> Any:
    from exporters.ledger.reader import LedgerReader

    url = getattr(args, "ledger", None) or getattr(args, "_default_ledger", None)
    if not url:
        raise ValueError("no ledger configured: pass --ledger PATH_OR_URL")
    return LedgerReader(url)


def _cmd_export(args: argparse.Namespace) -> int:
    from billing.export import export_records

    n = export_records(
        _reader(args),
        start=args.start,
        end=args.end,
        fmt=args.format,
        path=args.output,
        tenant=args.tenant,
        model=args.model,
        progress=not args.no_progress,
    )
    print(f"exported {n} records to {args.output}", file=sys.stderr)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    """Print each ledger record of the request id (JSON, one per line) and its trace link
    (``telemetry.trace_url_template`` with ``{trace_id}`` / ``{span_id}``)."""
    import json

    from exporters.ledger.schema import RAW_COLUMNS, row_to_record

    reader = _reader(args)
    where, params = "request_id = ?", [args.request_id]
    if args.tenant:
        where, params = where + " AND tenant = ?", [*params, args.tenant]
    rows = reader.fetch_all(
        f"SELECT {', '.join(RAW_COLUMNS)} FROM usage_records WHERE {where} ORDER BY ts",
        tuple(params))
    if not rows:
        raise ValueError(f"no ledger record with request id {args.request_id!r}"
                         + (f" for tenant {args.tenant!r}" if args.tenant else ""))
    template = args._trace_url_template
    for row in rows:
        record = row_to_record(row)
        print(json.dumps(dataclasses.asdict(record), ensure_ascii=False, sort_keys=True))
        if record.trace_id:
            link = (template.format(trace_id=record.trace_id, span_id=record.span_id or "")
                    if template else f"trace_id {record.trace_id} (set telemetry.trace_url_template "
                    "for a link)")
            print(f"trace: {link}")
    return 0


def _cmd_reprice(args: argparse.Namespace) -> int:
    from billing.pricing import PriceBook, round_bill
    from billing.reprice import reprice

    book = PriceBook.load(getattr(args, "pricing", None) or DEFAULT_PRICING)
    result = reprice(
        _reader(args),
        book,
        start=args.start,
        end=args.end,
        changed_by=args.changed_by,
        reason=args.reason,
        dry_run=args.dry_run,
    )
    verb = "would change" if args.dry_run else "changed"
    print(
        f"examined {result.examined} records, {verb} {result.changed}; total "
        f"{round_bill(result.old_total)} -> {round_bill(result.new_total)} {book.currency}"
    )
    if result.changed and not args.dry_run:
        _reconcile_cost_budgets(args)
    return 0


def _reconcile_cost_budgets(args: argparse.Namespace) -> None:
    """A reprice moves what cost budgets have used: set their counters to the new sums."""
    from billing.budget_store import BudgetStore
    from billing.periods import load_zone

    store = BudgetStore(getattr(args, "ledger", None) or args._default_ledger)
    try:
        budgets = [b for b in store.load() if b.metric == "cost"]
        if budgets:
            count = store.reconcile_all(budgets, load_zone(args._budget_timezone))
            print(f"cost budgets: {count} period counter(s) reconciled with the repriced ledger")
    finally:
        store.close()


def _cmd_report(args: argparse.Namespace) -> int:
    from billing.output import write_chart, write_report
    from billing.report import build_report, parse_by

    by = parse_by(args.by)
    rows = build_report(
        _reader(args),
        start=args.start,
        end=args.end,
        period=args.period,
        by=by,
        tenant=args.tenant,
        model=args.model,
        source=args.source,
        tz=args.tz,
    )
    write_report(rows, by, args.format, args.output)
    if args.chart:
        write_chart(rows, args.chart)
    return 0


def _cmd_ledger_status(args: argparse.Namespace) -> int:
    from exporters.ledger.dsn import redact_dsn
    from exporters.ledger.reader import parse_ledger_url
    from exporters.ledger.spool import (
        CONFLICTS_NAME,
        QUARANTINE_NAME,
        count_lines,
        default_spool_dir,
    )

    reader = _reader(args)
    kind, target = parse_ledger_url(reader.target)
    # records: every row (failed attempts too); billed: the ok records, one per
    # (tenant, request_id); replays: retries of a billed request with the same payload.
    records, billed = reader.fetch_all(
        "SELECT COUNT(*), SUM(CASE WHEN status = 'ok' THEN 1 ELSE 0 END) FROM usage_records"
    )[0]
    replayed, replays = reader.fetch_all(
        "SELECT COUNT(*), SUM(replays) FROM request_replays"
    )[0]
    version = reader.fetch_all("SELECT MAX(version) FROM schema_migrations")[0][0]
    spool_dir = getattr(args, "spool_dir", None) or default_spool_dir(
        target if kind == "sqlite" else None
    )
    names = sorted(os.listdir(spool_dir)) if os.path.isdir(spool_dir) else []
    spools = [n for n in names if n.startswith("spool-") and n.endswith(".jsonl")]
    quarantine = os.path.join(spool_dir, QUARANTINE_NAME)
    conflicts = os.path.join(spool_dir, CONFLICTS_NAME)
    print(f"ledger: {redact_dsn(reader.target)} ({kind})")
    print(f"schema_version: {version}")
    print(f"records: {records}")
    print(f"billed_records: {int(billed or 0)}")
    print(f"replayed_requests: {replayed} ({int(replays or 0)} replays)")
    print(f"spool_dir: {spool_dir}")
    print(f"spool_files: {len(spools)}")
    print(f"spool_pending: {sum(count_lines(os.path.join(spool_dir, n)) for n in spools)}")
    print(f"quarantined: {count_lines(quarantine) if os.path.exists(quarantine) else 0}")
    print(f"conflicts: {count_lines(conflicts) if os.path.exists(conflicts) else 0}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point; errors print one line and exit 2."""
    parser = argparse.ArgumentParser(prog="paddle-meter")
    add_subcommands(
        parser.add_subparsers(dest="command", required=True),
        default_ledger=os.environ.get("PADDLE_METER_LEDGER"),
    )
    args = parser.parse_args(argv)
    from exporters.ledger.base import LedgerUnavailable

    try:
        return args.func(args)
    except (ValueError, OSError, LedgerUnavailable) as exc:
        from exporters.ledger.dsn import redact_dsn

        print(f"paddle-meter: error: {redact_dsn(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
