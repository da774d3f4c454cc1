"""Load and validate the serving configuration: embedded default, user file, CLI overrides.

The embedded default is config/default.yaml. A user file is deep-merged over it, so it only
needs the keys it changes; a key the default does not have is an error (a typo must fail at
start-up, not be ignored), so config/default.yaml is also the schema: every accepted key is
there, with a comment. Two maps are free-form and replaced whole, not merged: ``models`` (a
user file that lists models replaces the default's, since serving a model you did not ask
for is surprising) and ``telemetry.otlp_headers`` (header name -> value).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from exporters.ledger.spool import SPOOL_DIR_NAME

__all__ = [
    "WORKER_INDEX_ENV",
    "ConfigError",
    "auth_secret_path",
    "DEFAULT_CONFIG_PATH",
    "PROJECT_ROOT",
    "ledger_options",
    "ledger_url",
    "load_config",
    "pricing_path",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "default.yaml"

# Free-form maps, replaced whole by a user file: what each maps, for the error message.
_FREE_FORM = {
    ("models",): "model name -> settings",
    ("telemetry", "otlp_headers"): "header name -> value",
    ("rate_limits", "keys"): "key id -> {requests_per_minute, tokens_per_minute}",
}
# ``ledger`` keys handed to exporters.ledger.open_ledger as keyword options when not null.
_LEDGER_OPTIONS = (
    "spool_dir",
    "max_batch",
    "retry_interval_s",
    "busy_timeout_ms",
    "synchronous",
    "connect_timeout_s",
    "max_pending",
)
# Integer settings and their least value: a wrong one must fail at start-up, not under load.
_POSITIVE_INTS = {
    ("server", "max_concurrent_rpcs"): 1,
    ("server", "max_concurrent_http"): 1,
    ("server", "max_queued_inferences"): 0,
    ("server", "max_json_depth"): 1,
    ("server", "inference_threads"): 1,
    ("metering", "max_replays"): 0,
    ("ledger", "max_pending"): 1,
    ("auth", "max_failures"): 1,
}


# Set by `paddle-meter serve --workers N` in each worker process: its index 0..N-1 (the
# stable `worker` label of its series on /metrics, exporters/worker_metrics.py).
WORKER_INDEX_ENV = "PADDLE_METER_WORKER"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what is expected."""


def _merge(base: dict[str, Any], override: Mapping[str, Any], path: tuple[str, ...]) -> None:
    for key, value in override.items():
        where = ".".join((*path, key))
        if path + (key,) in _FREE_FORM:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a mapping of {_FREE_FORM[path + (key,)]}")
            base[key] = copy.deepcopy(dict(value))
            continue
        if key not in base:
            known = ", ".join(sorted(base)) or "(none)"
            raise ConfigError(f"unknown setting {where!r}; known here: {known}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
            _merge(base[key], value, path + (key,))
        else:
            base[key] = value


def _validate_models(models: Mapping[str, Any]) -> None:
    for name, spec in models.items():
        if not isinstance(spec, Mapping) or "kind" not in spec:
            raise ConfigError(f"models.{name}: needs at least 'kind' (ocr or ernie)")
        unknown = set(spec) - {"kind", "options"}
        if unknown:
            raise ConfigError(f"models.{name}: unknown keys {sorted(unknown)}; use kind/options")
        if "/" in name or not name:
            raise ConfigError(f"models.{name!r}: a model name must be non-empty, without '/'")


def _validate_headers(headers: Mapping[str, Any]) -> None:
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigError(
                f"telemetry.otlp_headers.{name}: header names and values must be strings"
            )


def _validate_ints(config: Mapping[str, Any]) -> None:
    for (block, key), least in _POSITIVE_INTS.items():
        value = config[block][key]
        if value is None and block == "ledger":  # null: the writer's default
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{block}.{key}: expected an integer >= {least}, got {value!r}")


_AUTH_MODES = ("off", "required")
_POSITIVE_NUMBERS = (
    ("auth", "cache_ttl_s"),
    ("auth", "max_stale_s"),
    ("auth", "failure_window_s"),
)


def _validate_auth(config: dict[str, Any]) -> None:
    auth = config["auth"]
    mode = auth["mode"]
    if mode is False:  # YAML 1.1 reads a bare `off` as false
        mode = auth["mode"] = "off"
    if mode not in _AUTH_MODES:
        raise ConfigError(f"auth.mode: expected one of {list(_AUTH_MODES)}, got {mode!r}")
    for block, key in _POSITIVE_NUMBERS:
        value = config[block][key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{block}.{key}: expected a number > 0, got {value!r}")
    grace = auth["rotation_grace_s"]
    if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
        raise ConfigError(f"auth.rotation_grace_s: expected a number >= 0, got {grace!r}")
    if not isinstance(auth["metrics_require_key"], bool):
        raise ConfigError("auth.metrics_require_key: expected true or false")
    if mode == "required" and not config["metering"]["enabled"]:
        raise ConfigError(
            "auth.mode: required needs metering.enabled: true (metering admits each call)"
        )
    tls = config["server"]["tls"]
    if bool(tls["cert_file"]) != bool(tls["key_file"]):
        raise ConfigError("server.tls: set both cert_file and key_file, or neither")
    if tls["client_ca_file"] and not tls["cert_file"]:
        raise ConfigError("server.tls.client_ca_file needs cert_file and key_file as well")


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Return the effective configuration; raises ConfigError with a precise message."""
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    if path is not None:
        try:
            user = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(user, Mapping):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        _merge(config, user, ())
    if overrides:
        _merge(config, overrides, ())
    _validate_models(config["models"] or {})
    _validate_headers(config["telemetry"]["otlp_headers"] or {})
    _validate_ints(config)
    _validate_auth(config)
    _validate_billing(config)
    return config


def _validate_billing(config: dict[str, Any]) -> None:
    from billing.budgets import parse_budgets_config, parse_rate_limits
    from billing.periods import load_zone

    try:
        config["billing"]["timezone"] = load_zone(config["billing"]["timezone"]).key
    except ValueError as exc:
        raise ConfigError(f"billing.timezone: {exc}") from exc
    try:
        parse_budgets_config(config["budgets"]["limits"])
        parse_rate_limits(config["rate_limits"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    from billing.anomalies import parse_settings

    try:
        parse_settings(config["anomalies"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    for key in ("ocr_estimate_chars_per_image", "refresh_s", "reconcile_interval_s",
                "reservation_ttl_s"):
        value = config["budgets"][key]
        if value is None and key == "reservation_ttl_s":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"budgets.{key}: expected a number >= 0, got {value!r}")


def ledger_url(config: Mapping[str, Any]) -> str:
    """The configured ledger: ``ledger.url``, else the SQLite file in the data dir."""
    url = config["ledger"]["url"]
    if url:
        return str(url)
    return str(Path(config["server"]["data_dir"]) / "ledger.sqlite3")


def ledger_options(config: Mapping[str, Any], data_dir: str | Path | None = None) -> dict[str, Any]:
    """Keyword options for :func:`exporters.ledger.open_ledger` from the ``ledger`` block.

    Only settings that are not null are passed, so a null leaves the writer's own default.
    ``spool_dir`` defaults to ``<data_dir>/ledger.spool`` for every ledger kind (``data_dir``:
    the server's, else ``server.data_dir``). A setting the configured kind does not take
    (``busy_timeout_ms`` with PostgreSQL) makes ``open_ledger`` raise ValueError at start-up.
    """
    settings = config["ledger"]
    options = {key: settings[key] for key in _LEDGER_OPTIONS if settings.get(key) is not None}
    if "spool_dir" not in options:
        base = Path(data_dir if data_dir is not None else config["server"]["data_dir"])
        options["spool_dir"] = str(base / SPOOL_DIR_NAME)
    return options


def auth_secret_path(config: Mapping[str, Any]) -> Path:
    """The server secret's file: ``auth.secret_file``, else ``<data_dir>/auth.secret``
    ($PADDLE_METER_AUTH_SECRET, when set, wins over either: auth/secret.py)."""
    path = config["auth"]["secret_file"]
    return Path(path) if path else Path(config["server"]["data_dir"]) / "auth.secret"


def pricing_path(config: Mapping[str, Any]) -> Path:
    """The configured price table, else config/pricing.yaml of this project."""
    path = config["pricing"]["file"]
    return Path(path) if path else PROJECT_ROOT / "config" / "pricing.yaml"
