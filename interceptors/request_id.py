"""Request-id policy: which id a metered call carries, and which ids are accepted.

The request id keys the bill (one ledger row per id: a retry with the same id is billed
once), so only plain tokens are accepted from callers. Order: the ``x-request-id``
header/metadata, then the protocol's own id set by the frontend (pipeline ``logid``, OIP
``id``), else 32 random hex digits (a UUID4's worth of randomness).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from exporters import semconv as sc

__all__ = ["REQUEST_ID_PATTERN", "carried_request_id", "resolve_request_id"]

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def carried_request_id(carrier: Mapping[str, str]) -> str | None:
    """The request's ``x-request-id`` header/metadata when it is acceptable, else None."""
    header_id = carrier.get(sc.HEADER_REQUEST_ID)
    if header_id is not None and not REQUEST_ID_PATTERN.match(header_id):
        return None
    return header_id


def resolve_request_id(header_id: str | None, protocol_id: object | None) -> str:
    """The call's id: ``header_id`` wins, then an acceptable ``protocol_id``, else random."""
    rid = header_id
    if rid is None and protocol_id is not None:
        candidate = str(protocol_id)
        rid = candidate if REQUEST_ID_PATTERN.match(candidate) else None
    return rid or os.urandom(16).hex()
