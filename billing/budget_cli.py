"""``paddle-meter budgets``: set, list, show and remove budgets.

The commands work on the configured ledger database (``ledger.url``, else the SQLite file
in the data dir; ``--ledger`` overrides), where every server process reads its budgets
from (within ``budgets.refresh_s``). Periods are days, weeks and months of
``billing.timezone``. Errors exit 2 with ``paddle-meter: error: ...`` and no DSN password.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["add_budget_subcommands"]

_COLUMNS = ("tenant", "key", "period", "metric", "limit", "used", "reserved", "remaining",
            "soft", "resets_at")


def add_budget_subcommands(subparsers: Any, *, config: Mapping[str, Any]) -> None:
    """Register ``budgets set|list|show|remove`` on an argparse subparsers object."""
    from serving.config import ledger_url, pricing_path

    defaults = {
        "_budget_ledger": ledger_url(config),
        "_budget_timezone": config["billing"]["timezone"],
        "_budget_pricing": str(pricing_path(config)),
    }
    budgets = subparsers.add_parser("budgets", help="set, list, show and remove budgets")
    sub = budgets.add_subparsers(dest="budgets_command", required=True)

    def common(p: argparse.ArgumentParser, *, output: bool = True) -> None:
        p.add_argument("--ledger", dest="budget_ledger",
                       help="ledger path or URL; default: the configured ledger")
        if output:
            p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(**defaults)

    put = sub.add_parser("set", help="create or change a budget")
    put.add_argument("--tenant", required=True)
    put.add_argument("--key", help="a key id: the budget of that key only (default: the tenant's)")
    put.add_argument("--period", required=True, help="day | week | month (of billing.timezone)")
    limit = put.add_mutually_exclusive_group(required=True)
    limit.add_argument("--limit-cost", help="in the price table's currency, e.g. 500")
    limit.add_argument("--limit-tokens", type=int, help="billable tokens")
    limit.add_argument("--limit-characters", type=int, help="recognised characters (OCR)")
    limit.add_argument("--limit-requests", type=int, help="billed requests")
    put.add_argument("--soft", type=float, help="warn once at this fraction, e.g. 0.8")
    common(put)
    put.set_defaults(func=_set)

    lst = sub.add_parser("list", help="every budget with used, reserved and remaining")
    common(lst)
    lst.set_defaults(func=_list, tenant=None)

    show = sub.add_parser("show", help="the budgets of one tenant")
    show.add_argument("--tenant", required=True)
    common(show)
    show.set_defaults(func=_list)

    remove = sub.add_parser("remove", help="delete a budget (its history stays)")
    remove.add_argument("--tenant", required=True)
    remove.add_argument("--key")
    remove.add_argument("--period", required=True)
    remove.add_argument("--metric", required=True, help="cost | tokens | characters | requests")
    common(remove, output=False)
    remove.set_defaults(func=_remove)


def _store(args: argparse.Namespace) -> Any:
    from billing.budget_store import BudgetStore

    return BudgetStore(args.budget_ledger or args._budget_ledger)


def _currency(args: argparse.Namespace) -> str:
    from billing.pricing import PriceBook

    return PriceBook.load(args._budget_pricing).currency


def _set(args: argparse.Namespace) -> int:
    from billing.budgets import parse_budget

    entry = {"tenant": args.tenant, "key": args.key, "period": args.period, "soft": args.soft,
             "limit_cost": args.limit_cost, "limit_tokens": args.limit_tokens,
             "limit_characters": args.limit_characters, "limit_requests": args.limit_requests}
    budget = parse_budget({k: v for k, v in entry.items() if v is not None}, source="cli",
                          where="budget")
    store = _store(args)
    try:
        store.put(budget)
        return _print(args, store, tenant=budget.tenant, only=budget.budget_id)
    finally:
        store.close()


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        return _print(args, store, tenant=args.tenant)
    finally:
        store.close()


def _remove(args: argparse.Namespace) -> int:
    from billing.budgets import METRICS, budget_id

    if args.metric not in METRICS:
        raise ValueError(f"--metric: one of {', '.join(METRICS)}")
    store = _store(args)
    try:
        wanted = budget_id(args.tenant, args.key, args.period, args.metric)
        if not store.remove(wanted):
            raise ValueError(f"no budget {wanted}")
        print(f"removed budget {wanted}")
        return 0
    finally:
        store.close()


def _print(args: argparse.Namespace, store: Any, *, tenant: str | None,
           only: str | None = None) -> int:
    from billing.budget_view import budget_rows

    rows = budget_rows(store, timezone=args._budget_timezone, currency=_currency(args),
                       tenant=tenant)
    if only is not None:
        rows = [r for r in rows if r["budget_id"] == only]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    if not rows:
        print("no budgets" + (f" for tenant {tenant}" if tenant else ""))
        return 0
    table = [[_cell(row, c) for c in _COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(_COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True)).rstrip())
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _cell(row: Mapping[str, Any], column: str) -> str:
    value = row[column]
    if column == "key":
        return value or "*"
    if column in ("limit", "used", "reserved", "remaining") and row["metric"] == "cost":
        return f"{value} {row['unit']}"
    if column == "metric" and row["metric"] != "cost":
        return row["metric"]
    if column == "resets_at":
        return f"{value[:16].replace('T', ' ')} {row['timezone']}"
    if value is None:
        return "-"
    return str(value)
