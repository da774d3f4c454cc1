"""Pytest fixtures for the real-collector harness.

Import the fixtures into a test module (or a conftest) to use them::

    from support.fixtures import collector, otlp_sink  # noqa: F401

`otlp_sink` (module scope) is the OTLP/gRPC receiver at the end of the pipe;
`collector` (module scope) is a running ``rotel-agent`` exporting to it. Tests
sharing a module share both, so a test should `otlp_sink.clear()` first or tell
its data apart (e.g. a unique ``service.name``). A test that stops the collector
must start it again before it ends (`collector.start()` reuses the ports).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .collector import OtlpSink, RotelCollector

__all__ = ["collector", "otlp_sink"]


@pytest.fixture(scope="module")
def otlp_sink() -> Iterator[OtlpSink]:
    """A started OtlpSink, stopped after the module."""
    with OtlpSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def collector(otlp_sink: OtlpSink) -> Iterator[RotelCollector]:
    """A running rotel-agent exporting to `otlp_sink`, closed after the module."""
    with RotelCollector(otlp_sink.endpoint) as agent:
        yield agent
