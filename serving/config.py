"""Load and validate the serving configuration: embedded default, user file, CLI overrides.

The embedded default is config/default.yaml. A user file is deep-merged over it, so it only
needs the keys it changes; a key the default does not have is an error (a typo must fail at
start-up, not be ignored). ``models`` is the exception: a user file that lists models replaces
the default's models, since serving a model you did not ask for is surprising.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DEFAULT_CONFIG_PATH",
    "PROJECT_ROOT",
    "ledger_url",
    "load_config",
    "pricing_path",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "default.yaml"

# Sections whose values are free-form maps (model names and their kind-specific options).
_FREE_FORM = {("models",)}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what is expected."""


def _merge(base: dict[str, Any], override: Mapping[str, Any], path: tuple[str, ...]) -> None:
    for key, value in override.items():
        where = ".".join((*path, key))
        if path + (key,) in _FREE_FORM:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a mapping of model name -> settings")
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
    return config


def ledger_url(config: Mapping[str, Any]) -> str:
    """The configured ledger: ``ledger.url``, else the SQLite file in the data dir."""
    url = config["ledger"]["url"]
    if url:
        return str(url)
    return str(Path(config["server"]["data_dir"]) / "ledger.sqlite3")


def pricing_path(config: Mapping[str, Any]) -> Path:
    """The configured price table, else config/pricing.yaml of this project."""
    path = config["pricing"]["file"]
    return Path(path) if path else PROJECT_ROOT / "config" / "pricing.yaml"
