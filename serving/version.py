"""The server's name and version, as OIP server metadata and the HTTP app report them.

Read once from the installed package's metadata, so a release bump in pyproject.toml is the
only edit; a source tree that is not installed reports ``0.0.0``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["SERVER_NAME", "SERVER_VERSION"]

SERVER_NAME = "paddle-meter"

try:
    SERVER_VERSION: str = version(SERVER_NAME)
except PackageNotFoundError:  # running from a source tree that is not installed
    SERVER_VERSION = "0.0.0"
