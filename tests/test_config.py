"""The config loader against the real config/default.yaml: every setting the code accepts is
there with a comment, each is accepted from a user file and reaches the code that uses it,
and an unknown key is rejected."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from exporters.ledger import open_ledger
from exporters.ledger.jsonl import JsonlLedger
from exporters.ledger.postgres import PostgresLedger
from exporters.ledger.sqlite import SqliteLedger
from exporters.otel import _FILE_KEYS, TelemetryConfig
from serving.app import PaddleMeterServer
from serving.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ledger_options,
    ledger_url,
    load_config,
)
from serving.metering_setup import build_metering

LEDGER_SETTINGS = {
    "max_batch": 17,
    "retry_interval_s": 0.25,
    "busy_timeout_ms": 1234,
    "synchronous": "EXTRA",
    "max_pending": 321,
}


def _user_file(tmp_path: Path, settings: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings, allow_unicode=True), encoding="utf-8")
    return path


def _writer_options(cls: type) -> set[str]:
    params = list(inspect.signature(cls.__init__).parameters)[2:]  # self, the location
    return set(params)


def test_default_has_every_setting_the_code_accepts() -> None:
    config = load_config()
    assert set(config["telemetry"]) == set(_FILE_KEYS)
    writers = set().union(*map(_writer_options, (SqliteLedger, PostgresLedger, JsonlLedger)))
    assert set(config["ledger"]) == {"url"} | writers


def test_every_default_setting_has_a_comment() -> None:
    lines = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8").splitlines()
    uncommented = []
    for index, line in enumerate(lines):
        match = re.match(r"^\s*([a-z_]+):\s*(\S.*)?$", line)
        if not match or not match.group(2):  # a section header: its keys carry the comments
            continue
        previous = lines[index - 1].strip() if index else ""
        if "#" not in line and not previous.startswith("#"):
            uncommented.append(line.strip())
    assert not uncommented, uncommented


def test_telemetry_settings_are_accepted_and_reach_telemetry_config(tmp_path: Path) -> None:
    path = _user_file(
        tmp_path,
        {
            "telemetry": {
                "otlp_headers": {"authorization": "Bearer s3cret", "x-team": "finance"},
                "otlp_timeout_s": 2.5,
                "service_name": "meter-east",
            }
        },
    )
    config = load_config(path)
    telemetry = TelemetryConfig.from_mapping(config["telemetry"], env={})
    assert telemetry.headers == {"authorization": "Bearer s3cret", "x-team": "finance"}
    assert telemetry.timeout_s == 2.5
    assert telemetry.service_name == "meter-east"
    defaults = TelemetryConfig.from_mapping(load_config()["telemetry"], env={})
    assert (defaults.headers, defaults.timeout_s, defaults.service_name) == ({}, 10, "paddle-meter")


def test_otlp_headers_are_replaced_whole_and_must_be_strings(tmp_path: Path) -> None:
    path = _user_file(tmp_path, {"telemetry": {"otlp_headers": {"any-name": "v"}}})
    assert load_config(path)["telemetry"]["otlp_headers"] == {"any-name": "v"}
    with pytest.raises(ConfigError, match="otlp_headers: expected a mapping of header name"):
        load_config(_user_file(tmp_path, {"telemetry": {"otlp_headers": ["a=b"]}}))
    with pytest.raises(ConfigError, match="otlp_headers.x-n: header names and values must be"):
        load_config(_user_file(tmp_path, {"telemetry": {"otlp_headers": {"x-n": 5}}}))


def test_ledger_settings_are_accepted_and_reach_the_writer(tmp_path: Path) -> None:
    spool = tmp_path / "my-spool"
    path = _user_file(
        tmp_path,
        {
            "server": {"data_dir": str(tmp_path / "data")},
            "ledger": {**LEDGER_SETTINGS, "spool_dir": str(spool)},
            "telemetry": {"prometheus": False},
        },
    )
    config = load_config(path)
    assert ledger_options(config) == {**LEDGER_SETTINGS, "spool_dir": str(spool)}
    # Through the server's own assembly, so the wiring in metering_setup is what is tested.
    metering = build_metering(config, tmp_path / "data")
    try:
        ledger = metering.ledger
        assert isinstance(ledger, SqliteLedger)
        assert ledger.path == str((tmp_path / "data" / "ledger.sqlite3").resolve())
        # The writer's own connection and group-commit writer (private: no public view yet).
        assert ledger._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 1234
        assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 3  # EXTRA
        assert ledger._writer._max_batch == 17
        assert ledger._writer._retry_interval_s == 0.25
        assert ledger._writer._spool.directory == str(spool)
        assert ledger._writer._max_pending == 321
    finally:
        metering.shutdown()


def test_null_ledger_settings_keep_the_writer_defaults(tmp_path: Path) -> None:
    config = load_config(_user_file(tmp_path, {"server": {"data_dir": str(tmp_path / "d")}}))
    assert ledger_options(config) == {"spool_dir": str(tmp_path / "d" / "ledger.spool")}
    assert ledger_options(config, tmp_path / "run") == {
        "spool_dir": str(tmp_path / "run" / "ledger.spool")
    }


def test_a_setting_the_ledger_kind_does_not_take_fails_at_start(tmp_path: Path) -> None:
    config = load_config(_user_file(tmp_path, {"ledger": {"connect_timeout_s": 3}}))
    assert ledger_options(config, tmp_path)["connect_timeout_s"] == 3  # for PostgreSQL
    with pytest.raises(
        ValueError, match=r"unknown sqlite ledger option\(s\) \['connect_timeout_s'\]"
    ):
        open_ledger(
            ledger_url(config | {"ledger": {"url": str(tmp_path / "l.sqlite3")}}),
            **ledger_options(config, tmp_path),
        )


@pytest.mark.parametrize(
    ("settings", "where"),
    [
        ({"telemetry": {"otlp_header": {"a": "b"}}}, "telemetry.otlp_header"),
        ({"telemetry": {"otlp_timeout": 3}}, "telemetry.otlp_timeout"),
        ({"ledger": {"busy_timeout": 10}}, "ledger.busy_timeout"),
        ({"ledger": {"spool": "/tmp/x"}}, "ledger.spool"),
        ({"servr": {"host": "0.0.0.0"}}, "servr"),
    ],
)
def test_unknown_key_is_rejected(tmp_path: Path, settings: dict, where: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown setting '{re.escape(where)}'"):
        load_config(_user_file(tmp_path, settings))


LIMITS = {
    "max_concurrent_rpcs": 7,
    "max_concurrent_http": 9,
    "max_queued_inferences": 5,
    "max_json_depth": 11,
    "inference_threads": 3,
}


def test_limit_settings_have_their_defaults_and_reach_the_server(tmp_path: Path) -> None:
    defaults = load_config()
    assert {k: defaults["server"][k] for k in LIMITS} == {
        "max_concurrent_rpcs": 128,
        "max_concurrent_http": 128,
        "max_queued_inferences": 64,
        "max_json_depth": 64,
        "inference_threads": 8,
    }
    assert defaults["metering"]["max_replays"] == 10
    config = load_config(
        _user_file(
            tmp_path,
            {
                "server": {**LIMITS, "data_dir": str(tmp_path / "data")},
                "metering": {"max_replays": 3},
                "telemetry": {"prometheus": False},
            },
        )
    )
    server = PaddleMeterServer(config)
    try:
        # Where each limit is enforced (private: no public view of them).
        assert (server._max_rpcs, server._max_http, server._max_json_depth) == (7, 9, 11)
        assert server.models._executor.capacity == 3 + 5
    finally:
        server.models.close()
    metering = build_metering(config, tmp_path / "data")
    try:
        assert metering.core.max_replays == 3
    finally:
        metering.shutdown()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"server": {"max_concurrent_rpcs": 0}},
            "server.max_concurrent_rpcs: expected an integer >= 1, got 0",
        ),
        (
            {"server": {"max_concurrent_http": "many"}},
            "server.max_concurrent_http: expected an integer >= 1, got 'many'",
        ),
        (
            {"server": {"max_queued_inferences": -1}},
            "server.max_queued_inferences: expected an integer >= 0, got -1",
        ),
        (
            {"server": {"max_json_depth": True}},
            "server.max_json_depth: expected an integer >= 1, got True",
        ),
        (
            {"metering": {"max_replays": 1.5}},
            "metering.max_replays: expected an integer >= 0, got 1.5",
        ),
        ({"ledger": {"max_pending": 0}}, "ledger.max_pending: expected an integer >= 1, got 0"),
    ],
)
def test_limit_settings_must_be_integers_in_range(
    tmp_path: Path, settings: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(_user_file(tmp_path, settings))
