"""JSONL ledger: seed-compatible lines, exactly once across writers, private file."""

from __future__ import annotations

import asyncio
import json
import os
import stat

from billing.synthetic import synthetic_record
from exporters.ledger import open_ledger


async def test_jsonl_lines_exactly_once_and_seed_fields(tmp_path):
    path = tmp_path / "log" / "usage.jsonl"
    a = open_ledger(f"jsonl://{path}")
    b = open_ledger(f"jsonl://{path}")  # a second writer (another worker) on the same file
    outs = await asyncio.gather(*(a.submit(synthetic_record(i)) for i in range(200)))
    assert all(o.inserted for o in outs)
    dup = b.write_batch([synthetic_record(5), synthetic_record(500)])
    assert [o.inserted for o in dup] == [False, True]
    a.shutdown()
    b.shutdown()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 201 and len({x["request_id"] for x in lines}) == 201
    first = lines[0]
    assert first["timestamp"] == first["ts"] and first["token_count"] == first["billable_tokens"]
    assert "image" in first and "content" in first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
