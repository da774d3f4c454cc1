"""``paddle-meter keys``: create, list, revoke and rotate API keys.

The commands work on the configured ledger database (``ledger.url``, else the SQLite file
in the data dir; ``--ledger`` overrides) with the configured server secret
(``$PADDLE_METER_AUTH_SECRET``, else ``auth.secret_file`` / ``<data_dir>/auth.secret``,
created 0600 by the first ``keys create``). The CLI reads the database directly, so who
may manage keys is decided by who may read the secret file and the ledger (file mode 0600,
the DSN's database user), not by a key.

``keys create`` and ``keys rotate`` print the key alone on stdout (so
``KEY=$(paddle-meter keys create ...)`` works) and what to do with it on stderr; the key is
shown only then. Nothing printed carries a digest, and errors (exit 2,
``paddle-meter: error: ...``) carry no DSN password.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import getpass
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["add_key_subcommands"]

_ROLES_HELP = "caller | gateway | auditor | admin"


def add_key_subcommands(subparsers: Any, *, config: Mapping[str, Any]) -> None:
    """Register ``keys create|list|revoke|rotate`` on an argparse subparsers object."""
    from serving.config import auth_secret_path, ledger_url

    auth = config["auth"]
    defaults = {
        "_key_ledger": ledger_url(config),
        "_key_secret_file": str(auth_secret_path(config)),
        "_key_ttl_s": float(auth["cache_ttl_s"]),
    }
    keys = subparsers.add_parser("keys", help="create, list, revoke and rotate API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--ledger",
            dest="key_ledger",
            help="ledger path or URL holding the keys; default: the configured ledger",
        )
        p.set_defaults(**defaults)

    create = keys_sub.add_parser("create", help="create a key (printed once, on stdout)")
    create.add_argument("--tenant", required=True, help="tenant billed ('*': auditor of all)")
    create.add_argument("--role", required=True, help=_ROLES_HELP)
    create.add_argument("--name", help="a note shown by `keys list` (who or what uses it)")
    create.add_argument(
        "--expires", help="YYYY-MM-DD: the key works through this UTC day (default: no expiry)"
    )
    create.add_argument("--json", action="store_true", help="print one JSON object")
    common(create)
    create.set_defaults(func=_guarded(_cmd_create))

    lst = keys_sub.add_parser("list", help="every key, masked (never the key nor its digest)")
    lst.add_argument("--json", action="store_true", help='print {"keys": [...]}')
    common(lst)
    lst.set_defaults(func=_guarded(_cmd_list))

    revoke = keys_sub.add_parser("revoke", help="revoke a key for good")
    revoke.add_argument("key_id", metavar="ID")
    common(revoke)
    revoke.set_defaults(func=_guarded(_cmd_revoke))

    rotate = keys_sub.add_parser(
        "rotate", help="new secret for a key (same id and tenant), printed once"
    )
    rotate.add_argument("key_id", metavar="ID")
    rotate.add_argument(
        "--grace",
        type=float,
        default=float(auth["rotation_grace_s"]),
        metavar="SECONDS",
        help="how long the old key keeps working (default auth.rotation_grace_s: %(default)g)",
    )
    rotate.add_argument("--json", action="store_true", help="print one JSON object")
    common(rotate)
    rotate.set_defaults(func=_guarded(_cmd_rotate))


def _guarded(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``cmd``; an expected failure prints one redacted line and exits 2."""

    def run(args: argparse.Namespace) -> int:
        from auth.keys import SecretMismatch
        from exporters.ledger.base import LedgerUnavailable
        from exporters.ledger.dsn import redact_dsn

        try:
            return cmd(args)
        except KeyError as exc:
            message = str(exc.args[0]) if exc.args else "unknown key"
        except (ValueError, OSError, SecretMismatch, LedgerUnavailable) as exc:
            message = str(exc)
        print(f"paddle-meter: error: {redact_dsn(message)}", file=sys.stderr)
        return 2

    return run


def _store(args: argparse.Namespace, *, create_secret: bool) -> Any:
    from auth.keys import KeyStore
    from auth.secret import load_server_secret

    secret = load_server_secret(args._key_secret_file, create=create_secret)
    return KeyStore(args.key_ledger or args._key_ledger, secret)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli"


def _cmd_create(args: argparse.Namespace) -> int:
    from auth.keys import check_key_fields, parse_expiry

    # Checked before the store opens: a typo creates neither a secret nor a database.
    check_key_fields(args.tenant, args.role, args.name)
    expires = parse_expiry(args.expires, "--expires") if args.expires else None
    store = _store(args, create_secret=True)
    try:
        record, key = store.create(
            tenant=args.tenant, role=args.role, name=args.name, expires=expires, actor=_actor()
        )
    finally:
        store.close()
    _print_key(args, record, key)
    until = f", works through {expires.isoformat()} (UTC)" if expires else ""
    print(
        f"created key {record.key_id} for tenant {record.tenant} (role {record.role}){until}; "
        "the key is shown only now: store it",
        file=sys.stderr,
    )
    return 0


def _short(ts: str | None, *, seconds: bool = False) -> str:
    """``2026-12-02T21:54Z`` (with ``seconds``: ``...21:54:07Z``) of a stored UTC timestamp;
    ``-`` for none."""
    return f"{ts[:19 if seconds else 16]}Z" if ts else "-"


def _cmd_list(args: argparse.Namespace) -> int:
    store = _store(args, create_secret=False)
    try:
        records = store.list()
    finally:
        store.close()
    if args.json:
        print(json.dumps({"keys": [r.public() for r in records]}))
        return 0
    now = _dt.datetime.now(_dt.timezone.utc)
    cols = ["id", "masked", "tenant", "role", "name", "created", "last used", "expires",
            "status"]
    rows = [
        [r.key_id, r.hint, r.tenant, r.role, r.name or "-", _short(r.created_at),
         _short(r.last_used_at), _short(r.expires_at), r.status(now)]
        for r in records
    ]
    sys.stdout.write(_table(cols, rows))
    if not records:
        print("no keys yet: paddle-meter keys create --tenant TENANT --role ROLE",
              file=sys.stderr)
    return 0


def _table(cols: list[str], rows: list[list[str]]) -> str:
    """Columns separated by two spaces, a dashed rule under the header (as `report`)."""
    cells = [cols, *rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _cmd_revoke(args: argparse.Namespace) -> int:
    store = _store(args, create_secret=False)
    try:
        before = store.get(args.key_id)
        record = store.revoke(args.key_id, actor=_actor())
    finally:
        store.close()
    if before is not None and before.revoked_at is not None:
        print(f"key {record.key_id} was already revoked at {_short(record.revoked_at)}")
    else:
        print(
            f"revoked {record.key_id}; every server refuses it within {args._key_ttl_s:g} s"
        )
    return 0


def _print_key(args: argparse.Namespace, record: Any, key: str) -> None:
    """The new key on stdout, alone (or with its listing as one JSON object): once."""
    if args.json:
        print(json.dumps({"id": record.key_id, "key": key, **record.public()}))
    else:
        print(key)


def _cmd_rotate(args: argparse.Namespace) -> int:
    store = _store(args, create_secret=False)
    try:
        record, key = store.rotate(args.key_id, grace_s=args.grace, actor=_actor())
    finally:
        store.close()
    _print_key(args, record, key)
    old = (
        f"the old key works until {_short(record.previous_valid_until, seconds=True)}"
        if args.grace > 0
        else "the old key stopped working now"
    )
    print(
        f"rotated key {record.key_id}; {old} (plus up to {args._key_ttl_s:g} s on running "
        "servers); the new key is shown only now: store it",
        file=sys.stderr,
    )
    return 0
