"""Synthetic usage records for tests and benchmarks (deterministic, no randomness source).

Not used by the server. ``synthetic_record(i)`` spreads records over tenants, models and
minutes so rollups get realistic cardinality.
"""

from __future__ import annotations

import datetime as _dt

from exporters.usage_record import UsageRecord

__all__ = ["synthetic_record"]

_START = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)


def synthetic_record(i: int, *, prefix: str = "syn", step_s: float = 3.0,
                     tenants: int = 5, start: _dt.datetime = _START) -> UsageRecord:
    """Record number ``i``: ts = start + i*step_s; OCR (2 of 3) or ERNIE; 1 in 50 fails."""
    ocr = i % 3 != 2
    ok = i % 50 != 7
    out = (100 + i % 900) if ocr and ok else 0
    inp = 0 if ocr or not ok else 20 + i % 490
    return UsageRecord(
        request_id=f"{prefix}-{i}",
        ts=(start + _dt.timedelta(seconds=i * step_s)).isoformat(),
        duration_ms=float(5 + i % 40),
        tenant=f"tenant-{i % tenants}",
        api_key_id=f"key-{i % tenants}",
        model="ocr" if ocr else "ernie",
        model_version="1",
        operation="ocr" if ocr else "text_classification",
        protocol="grpc" if i % 2 else "http",
        endpoint="/v2/models/ocr/infer" if ocr else "/v2/models/ernie/infer",
        status="ok" if ok else "INTERNAL",
        input_tokens=inp,
        output_tokens=out,
        characters=out,
        images=1 if ocr else 0,
        billable_tokens=inp + out,
        request_bytes=2000 + i % 5000,
        response_bytes=100 + out * 3,
        price_id=("ocr-2026-01" if ocr else "ernie-2026-01") if ok else None,
        cost=f"0.{(i % 999) + 1:06d}" if ok else "0.000000",
    )
