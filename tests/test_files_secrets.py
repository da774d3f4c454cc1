"""Bills and secrets: exports/reports are 0600, the data dir is private, DSN passwords never
show (repr, logs, raised errors, CLI output). Real files, the real local PostgreSQL."""

from __future__ import annotations

import logging
import os
import stat

import psycopg
import pytest

from billing.cli import main as bill_main
from billing.export import EXPORT_FORMATS, export_records
from billing.output import write_chart, write_report
from billing.report import build_report
from billing.synthetic import synthetic_record
from exporters.ledger import LedgerReader, open_ledger, redact_dsn
from exporters.ledger.postgres import LedgerConnectError
from serving.data_dir import DataDirError, prepare_data_dir

SECRET = "s3cret-Pw"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def sqlite_ledger(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("secrets") / "ledger.db")
    sink = open_ledger(path)
    sink.write_batch([synthetic_record(i) for i in range(50)])
    sink.shutdown()
    return path


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_exports_are_0600_and_replace_a_loose_file(sqlite_ledger, tmp_path, fmt, loose_umask):
    out = tmp_path / f"bill.{fmt}"
    out.write_text("old")
    os.chmod(out, 0o644)
    n = export_records(
        LedgerReader(sqlite_ledger),
        start="2026-01-01",
        end="2026-12-31",
        fmt=fmt,
        path=str(out),
        progress=False,
    )
    assert n == 50 and _mode(out) == 0o600 and out.read_bytes() != b"old"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left


def test_a_failed_export_leaves_the_old_file_alone(sqlite_ledger, tmp_path):
    out = tmp_path / "bill.jsonl"
    out.write_text("previous bill\n")
    with pytest.raises(ValueError):
        export_records(
            LedgerReader(sqlite_ledger),
            start="2026-01-01",
            end="not a date",
            fmt="jsonl",
            path=str(out),
            progress=False,
        )
    assert out.read_text() == "previous bill\n" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("fmt", ["csv", "json", "table", "xlsx"])
def test_reports_and_charts_are_0600(sqlite_ledger, tmp_path, fmt, loose_umask):
    rows = build_report(LedgerReader(sqlite_ledger), start="2026-01-01", end="2026-12-31")
    out = tmp_path / f"report.{fmt}"
    write_report(rows, ("tenant", "model"), fmt, str(out))
    assert _mode(out) == 0o600
    chart = tmp_path / "trend.png"
    write_chart(rows, str(chart))
    assert _mode(chart) == 0o600 and chart.read_bytes()[:4] == b"\x89PNG"


def test_data_dir_is_created_private_and_loose_ones_are_tightened(tmp_path, loose_umask, caplog):
    new = prepare_data_dir(tmp_path / "a" / "data")
    assert new == tmp_path / "a" / "data" and _mode(new) == 0o700
    loose = tmp_path / "old"
    loose.mkdir()
    os.chmod(loose, 0o755)
    with caplog.at_level(logging.WARNING):
        assert _mode(prepare_data_dir(loose)) == 0o700
    assert any("loose permissions" in r.getMessage() for r in caplog.records)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataDirError, match="not a directory"):
        prepare_data_dir(tmp_path / "file")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a dir to another user")
def test_a_loose_data_dir_of_another_user_is_refused(tmp_path):
    other = tmp_path / "theirs"
    other.mkdir()
    os.chmod(other, 0o775)
    os.chown(other, 12345, 12345)
    with pytest.raises(DataDirError, match="chmod 700"):
        prepare_data_dir(other)
    assert _mode(other) == 0o775  # not ours to change


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (
            f"postgresql://bill:{SECRET}@db.local:5432/ledger",
            "postgresql://bill:***@db.local:5432/ledger",
        ),
        (
            f"postgres://bill:{SECRET}@db/x?sslmode=require",
            "postgres://bill:***@db/x?sslmode=require",
        ),
        (
            f"postgresql://db/x?user=bill&password={SECRET}&sslmode=require",
            "postgresql://db/x?user=bill&password=***&sslmode=require",
        ),
        (
            f"host=db user=bill password={SECRET} dbname=x",
            "host=db user=bill password=*** dbname=x",
        ),
        ("host=db password='with space\\' q' dbname=x", "host=db password=*** dbname=x"),
        (f'invalid dsn: "postgresql://u:{SECRET}@h/d"', 'invalid dsn: "postgresql://u:***@h/d"'),
        ("postgresql://bill@db/x", "postgresql://bill@db/x"),
        ("/var/lib/ledger.sqlite3", "/var/lib/ledger.sqlite3"),
    ],
)
def test_redact_dsn(dsn, shown):
    assert redact_dsn(dsn) == shown


def test_connection_errors_never_carry_the_password(capsys):
    from exporters.ledger.postgres import connect_postgres

    # a keyword DSN is not a ledger location, but the driver's errors may quote one
    for dsn in (
        f"host=127.0.0.1 port=1 password={SECRET} dbname=x",
        f"host=127.0.0.1 port=1 password={SECRET} dbname",
    ):
        with pytest.raises(LedgerConnectError) as info:
            connect_postgres(dsn, connect_timeout_s=1)
        assert SECRET not in str(info.value)
    for dsn in (
        f"postgresql://postgres:{SECRET}@127.0.0.1:1/x",
        f"postgresql://postgres:{SECRET}@127.0.0.1:1/x?bogus_option=1",
        f"postgresql://postgres:{SECRET}@127.0.0.1:1/x?password={SECRET}x",
    ):
        with pytest.raises(psycopg.OperationalError) as info:
            open_ledger(dsn, connect_timeout_s=1)
        assert isinstance(info.value, LedgerConnectError)
        assert SECRET not in str(info.value) and info.value.__cause__ is None
        assert bill_main(["ledger", "status", "--ledger", dsn]) == 2
    err = capsys.readouterr().err
    assert "error" in err and SECRET not in err


def test_postgres_ledger_repr_logs_and_status_are_redacted(tmp_path, caplog, capsys):
    from support.pg import admin_connection, temporary_database

    with temporary_database("pm_secret") as url:
        dsn = url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@", 1)
        assert SECRET in dsn  # trust auth accepts (and ignores) the password
        dbname = url.rsplit("/", 1)[1]
        with caplog.at_level(logging.DEBUG):
            sink = open_ledger(
                dsn, spool_dir=str(tmp_path / "spool"), retry_interval_s=0.1, connect_timeout_s=2
            )
            assert SECRET not in repr(sink) and SECRET not in str(sink)
            assert SECRET not in sink.url
            sink.write_batch([synthetic_record(1)])
            admin = admin_connection()
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
            try:
                assert sink.write_batch([synthetic_record(2)])[0].spooled
                assert sink.write_batch([synthetic_record(3)])[0].spooled
            finally:
                admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
                admin.close()
            assert sink.force_flush()
            sink.shutdown()
        assert sink.stats.db_errors >= 1
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "ledger commit failed" in logged and SECRET not in logged
        assert SECRET not in repr(LedgerReader(dsn))
        assert (
            bill_main(["ledger", "status", "--ledger", dsn, "--spool-dir", str(tmp_path / "spool")])
            == 0
        )
        out = capsys.readouterr().out
        assert SECRET not in out and "postgres:***@" in out and "records: 3" in out
