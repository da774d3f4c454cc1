"""Request-id and tenant policy: which id and tenant a metered call carries, which are refused.

The billing key is (tenant, request id): a retry with the same pair and the same payload
is billed once (interceptors/billing_policy.py). So an ``x-request-id`` or ``x-tenant`` the
caller sent but that is malformed is refused (:class:`serving.errors.ServingError`
``invalid_argument``), never silently replaced: a replaced id would bill each retry again,
a replaced tenant would bill someone else. Messages never echo the rejected value.

Id order: the ``x-request-id`` header/metadata, then the protocol's own id set by the
frontend (pipeline ``logid``, OIP ``id``; replaced by a random id when malformed, since
those fields predate this policy), else 32 random hex digits (a UUID4's worth).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from exporters import semconv as sc
from serving.errors import ServingError

__all__ = [
    "BAD_PROTOCOL_ID_MESSAGE",
    "BAD_REQUEST_ID_MESSAGE",
    "BAD_TENANT_MESSAGE",
    "REQUEST_ID_PATTERN",
    "TENANT_PATTERN",
    "carried_request_id",
    "carried_tenant",
    "checked_protocol_request_id",
    "resolve_request_id",
]

# fullmatch only: "$" in re.match would also accept a trailing newline.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
TENANT_PATTERN = re.compile(r"[A-Za-z0-9._\-]{1,64}")
BAD_REQUEST_ID_MESSAGE = (
    "x-request-id must be 1 to 128 characters of A-Z a-z 0-9 . _ : - ;"
    " send a valid x-request-id or none"
)
BAD_PROTOCOL_ID_MESSAGE = (
    "the request's id must be 1 to 128 characters of A-Z a-z 0-9 . _ : - "
    "(it is the billing key of the call); send a valid id or none"
)
BAD_TENANT_MESSAGE = (
    "x-tenant must be 1 to 64 characters of A-Z a-z 0-9 . _ - ; send a valid x-tenant or none"
)


def carried_request_id(carrier: Mapping[str, str]) -> str | None:
    """The request's ``x-request-id`` header/metadata; None when absent.

    Raises ServingError ``invalid_argument`` when it is present but malformed.
    """
    header_id = carrier.get(sc.HEADER_REQUEST_ID)
    if header_id is not None and REQUEST_ID_PATTERN.fullmatch(header_id) is None:
        raise ServingError("invalid_argument", BAD_REQUEST_ID_MESSAGE)
    return header_id


def carried_tenant(carrier: Mapping[str, str]) -> str:
    """The ``x-tenant`` header/metadata (surrounding blanks removed), ``default`` when absent.

    Raises ServingError ``invalid_argument`` when it is present but malformed (or blank).
    """
    raw = carrier.get(sc.HEADER_TENANT)
    if raw is None:
        return sc.DEFAULT_TENANT
    tenant = raw.strip()
    if TENANT_PATTERN.fullmatch(tenant) is None:
        raise ServingError("invalid_argument", BAD_TENANT_MESSAGE)
    return tenant


def checked_protocol_request_id(protocol_id: str | None) -> str | None:
    """A protocol's own request id (OIP ``id``), refused like a malformed ``x-request-id``:
    replacing it with a random id would bill each retry of the request again.

    Raises ServingError ``invalid_argument``; None and "" mean "no id".
    """
    if protocol_id and REQUEST_ID_PATTERN.fullmatch(protocol_id) is None:
        raise ServingError("invalid_argument", BAD_PROTOCOL_ID_MESSAGE)
    return protocol_id or None


def resolve_request_id(header_id: str | None, protocol_id: object | None) -> str:
    """The call's id: ``header_id`` wins, then an acceptable ``protocol_id``, else random."""
    rid = header_id
    if rid is None and protocol_id is not None:
        candidate = str(protocol_id)
        rid = candidate if REQUEST_ID_PATTERN.fullmatch(candidate) else None
    return rid or os.urandom(16).hex()
