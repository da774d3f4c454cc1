"""OTLP span encoding written straight to the protobuf wire format, for the span exporter.

The SDK encoder builds ~4 protobuf objects per attribute and re-hashes the Resource (a
json.dumps) for every span. ``SpanWireEncoder`` writes the wire format directly, encodes
the Resource and scope once per process, and caches each (key, value) attribute's bytes
(most are per-method constants); spans with events, links or non-scalar attributes go
through the SDK's own per-span encoder. tests/test_otlp_wire.py checks its output equals
the SDK's ``encode_spans``. Used from the batch span processor's worker thread, through
:func:`exporters.otel_fastpath.wire_encoded_span_exporter`; the SDK encoders it builds on
come from :func:`exporters.otel_fastpath.sdk_span_encoders` (the home of SDK private names).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from exporters.otel_fastpath import SdkSpanEncoders, sdk_span_encoders

__all__ = ["SpanWireEncoder"]

_INT64 = (-(1 << 63), (1 << 63) - 1)
_KV_CACHE_MAX = 4096


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 on the wire: two's complement, 10 bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (bytes, string, sub-message)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


class SpanWireEncoder:
    """``encode(spans) -> bytes`` of an ExportTraceServiceRequest, same content as the SDK's
    ``encode_spans``; one per exporter, used from the batch processor's worker thread."""

    def __init__(self, sdk: SdkSpanEncoders | None = None) -> None:
        sdk = sdk if sdk is not None else sdk_span_encoders()
        self._encode_scope = sdk.encode_scope
        self._encode_resource = sdk.encode_resource
        self._sdk_span = sdk.encode_span
        self._kinds = {
            kind: _varint(6 << 3) + _varint(value) for kind, value in sdk.span_kinds.items()
        }
        # id() -> (object, encoded bytes): the object is held so its id is never reused.
        self._resources: dict[int, tuple[Any, bytes]] = {}
        self._scopes: dict[int, tuple[Any, bytes]] = {}
        self._kv: dict[tuple[str, type, Any], bytes] = {}

    def encode(self, spans: Sequence[Any]) -> bytes:
        groups: dict[bytes, dict[bytes, list[bytes]]] = {}
        for span in spans:
            resource = self._cached(self._resources, span.resource, self._resource_bytes)
            scope = self._cached(self._scopes, span.instrumentation_scope, self._scope_bytes)
            groups.setdefault(resource, {}).setdefault(scope, []).append(self._span(span))
        out = []
        for resource, scopes in groups.items():
            scope_spans = b"".join(
                _field(2, scope + b"".join(_field(2, s) for s in encoded))
                for scope, encoded in scopes.items()
            )
            out.append(_field(1, resource + scope_spans))
        return b"".join(out)

    @staticmethod
    def _cached(cache: dict[int, tuple[Any, bytes]], obj: Any, make: Any) -> bytes:
        hit = cache.get(id(obj))
        if hit is None or hit[0] is not obj:
            hit = cache[id(obj)] = (obj, make(obj))
        return hit[1]

    def _resource_bytes(self, resource: Any) -> bytes:
        """ResourceSpans' ``resource`` (1) and ``schema_url`` (3) fields."""
        data = _field(1, self._encode_resource(resource).SerializeToString())
        return data + (_field(3, resource.schema_url.encode()) if resource.schema_url else b"")

    def _scope_bytes(self, scope: Any) -> bytes:
        """ScopeSpans' ``scope`` (1) and ``schema_url`` (3) fields."""
        data = _field(1, self._encode_scope(scope or None).SerializeToString())
        url = scope.schema_url if scope else None
        return data + (_field(3, url.encode()) if url else b"")

    def _span(self, span: Any) -> bytes:
        attrs = span.attributes or {}
        if span.events or span.links or span.dropped_events or span.dropped_links:
            return self._sdk_span(span).SerializeToString()
        encoded_attrs = []
        kv = self._kv
        for key, value in attrs.items():
            item = (key, type(value), value)
            data = kv.get(item)
            if data is None:
                data = self._key_value(key, value)
                if data is None:  # not a plain scalar: the SDK encoder knows them all
                    return self._sdk_span(span).SerializeToString()
                if len(kv) >= _KV_CACHE_MAX:
                    kv.clear()  # unique values (request ids) must not pin the cache
                kv[item] = data
            encoded_attrs.append(data)
        ctx = span.context
        parent = span.parent
        parts = [
            b"\x0a\x10",
            ctx.trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            ctx.span_id.to_bytes(8, "big"),
        ]
        if ctx.trace_state:
            state = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
            parts.append(_field(3, state.encode()))
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        parts.append(_field(5, span.name.encode()))
        parts.append(self._kinds[span.kind])
        parts += (
            b"\x39",
            struct.pack("<Q", span.start_time),
            b"\x41",
            struct.pack("<Q", span.end_time),
        )
        parts.extend(encoded_attrs)
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))
        status = span.status
        code = b"\x18" + _varint(status.status_code.value) if status.status_code.value else b""
        message = _field(2, status.description.encode()) if status.description else b""
        parts.append(_field(15, message + code))  # Status: message = 2, code = 3
        # flags: "has is_remote", plus "is remote" for a remote parent (the SDK's _span_flags)
        parts += (
            b"\x85\x01",
            struct.pack("<I", 0x300 if parent is not None and parent.is_remote else 0x100),
        )
        return b"".join(parts)

    @staticmethod
    def _key_value(key: str, value: Any) -> bytes | None:
        kind = type(value)
        if kind is str:
            any_value = _field(1, value.encode())
        elif kind is bool:
            any_value = b"\x10\x01" if value else b"\x10\x00"
        elif kind is int and _INT64[0] <= value <= _INT64[1]:
            any_value = b"\x18" + _varint(value)
        elif kind is float:
            any_value = b"\x21" + struct.pack("<d", value)
        else:
            return None
        return _field(9, (_field(1, key.encode()) if key else b"") + _field(2, any_value))
