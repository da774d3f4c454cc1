"""The usage record: one per request, the unit the ledger stores and bills.

Field names are the ledger columns of docs/design.md ("Usage record"). Built by the
metering core (interceptors/record.py) once a request has finished; priced by
billing/pricing.py (applied in interceptors/billing_policy.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["LEDGER_COLUMNS", "UsageRecord"]


@dataclasses.dataclass
class UsageRecord:
    request_id: str
    ts: str  # UTC ISO-8601 of the request start, e.g. 2026-11-28T16:41:14.123456+00:00
    duration_ms: float
    tenant: str
    api_key_id: str | None
    model: str
    model_version: str
    operation: str  # ocr / text_classification / embeddings / tokenize / health ...
    protocol: str  # grpc / http
    endpoint: str  # gRPC method path or HTTP route
    status: str  # "ok" or an error code (gRPC code name, HTTP status, pipeline err_no)
    input_tokens: int = 0
    output_tokens: int = 0
    characters: int = 0
    images: int = 0  # input files (one per image or PDF)
    pages: int = 0  # pages OCRed: 1 per image, N per N-page PDF
    billable_tokens: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    trace_id: str | None = None
    span_id: str | None = None
    price_id: str | None = None
    cost: str | None = None  # Decimal as string; currency comes from the price table
    content_sha256: str | None = None
    content: str | None = None  # only when content recording is turned on
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_jsonl_dict(self) -> dict[str, Any]:
        """Ledger fields plus the seed-compatible ones of the simple per-call log
        (``image``: one per request, whatever its pages; ``pages`` says how many)."""
        row = self.to_dict()
        row["timestamp"] = self.ts
        row["image"] = (self.content_sha256 or self.request_id) if self.images else None
        row["token_count"] = self.billable_tokens
        return row


LEDGER_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UsageRecord))
