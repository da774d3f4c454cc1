"""Test harnesses shared by the test suite: real peers run on loopback.

collector.py / otlp_sink.py: the real ``rotel-agent`` OpenTelemetry collector and
the OTLP receiver it exports to; fixtures.py: pytest fixtures around them.
"""
