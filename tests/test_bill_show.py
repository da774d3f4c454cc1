"""``paddle-meter bill show REQUEST_ID``: the ledger record(s) of a request and its trace link.

Real SQLite ledger, the real CLI in a subprocess with a config whose
``billing.trace_url_template`` points at a Jaeger UI. Ids are per tenant, so one id may
name two tenants' records; ``--tenant`` narrows; an unknown id is a clear error (exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from exporters.ledger import open_ledger
from exporters.usage_record import UsageRecord

PM = str(Path(sys.executable).with_name("paddle-meter"))
RECORD = UsageRecord(
    request_id="inv-2026-0042", ts="2026-12-03T08:00:00+00:00", duration_ms=80.0,
    tenant="finance", api_key_id=None, model="ocr", model_version="1", operation="ocr",
    protocol="http", endpoint="/v2/models/ocr/infer", status="ok", output_tokens=83,
    characters=83, images=1, billable_tokens=83, trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    span_id="00f067aa0ba902b7", price_id="ocr-2026-01", cost="0.002660",
)


def _show(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    config.write_text("billing: {trace_url_template: 'http://jaeger:16686/trace/{trace_id}'}\n")
    return subprocess.run([PM, "bill", "show", *args, "--ledger", str(tmp_path / "l.sqlite3")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PADDLE_METER_CONFIG": str(config)})


def test_bill_show_prints_the_records_and_the_trace_link(tmp_path):
    sink = open_ledger(str(tmp_path / "l.sqlite3"))
    sink.write_batch([RECORD, dataclasses.replace(RECORD, tenant="legal", trace_id=None,
                                                  span_id=None)])
    sink.shutdown()
    done = _show(tmp_path, "inv-2026-0042")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert [(r["tenant"], r["characters"], r["cost"]) for r in records] == [
        ("finance", 83, "0.002660"), ("legal", 83, "0.002660")]
    assert "trace: http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736" in lines
    only = _show(tmp_path, "inv-2026-0042", "--tenant", "legal")
    assert [json.loads(x)["tenant"] for x in only.stdout.splitlines()] == ["legal"]
    missing = _show(tmp_path, "no-such-id")
    assert missing.returncode == 2
    assert "no ledger record with request id 'no-such-id'" in missing.stderr
