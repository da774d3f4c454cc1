"""Fuzzing helpers shared by tests/test_fuzz.py (hypothesis, schemathesis against the live
server) and tests/test_fuzz_parsers.py (atheris, in process).

What is here: the seed corpus (``tests/fuzz_corpus/``, plus the known-bad inputs too big to
keep as files, generated), hypothesis strategies for malformed images, JSON bodies,
protobuf bytes and header values, raw senders for the four surfaces, and the one property
every fuzz test checks: no 5xx except the documented 503 / 504, no gRPC UNKNOWN / INTERNAL,
no pipeline err_no 10000 (Paddle Serving's "UNKNOW", the pipeline's 500).

Reproducible by default: every hypothesis test runs derandomized with a modest example
count; ``PADDLE_METER_FUZZ_EXAMPLES=N`` runs N examples per test instead (go bigger locally).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import httpx
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from serving.proto import pipeline_service_pb2 as pipeline_pb

__all__ = [
    "CORPUS_DIR",
    "DOCUMENTED_5XX",
    "FORBIDDEN_GRPC",
    "PIPELINE_INTERNAL_ERR_NO",
    "binary_header_length",
    "check_grpc",
    "check_http",
    "deep_json",
    "fuzz_settings",
    "grpc_metadata_values",
    "grpc_unary_methods",
    "http_client",
    "http_header_values",
    "json_values",
    "malformed_images",
    "malformed_json_bodies",
    "malformed_protobuf",
    "oip_documents",
    "Outcome",
    "pipeline_documents",
    "png",
    "png_bomb",
    "raw_http",
    "seed",
    "seeds",
]

CORPUS_DIR = Path(__file__).resolve().parents[1] / "fuzz_corpus"

#: the only 5xx the HTTP surfaces may answer: 503 (ledger cannot accept, overloaded, with
#: Retry-After) and 504 (inference over server.request_timeout_s), docs/design.md
DOCUMENTED_5XX = frozenset({503, 504})
#: gRPC codes that mean "the server failed", never an answer to bad input
FORBIDDEN_GRPC = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
#: Paddle Serving's UNKNOW: what the pipeline answers (with HTTP 200 / gRPC OK) for a 500
PIPELINE_INTERNAL_ERR_NO = 10000


def fuzz_settings(default_examples: int, **overrides: Any) -> settings:
    """Hypothesis settings for a fuzz test: derandomized (CI runs the same cases every time),
    no example database (nothing written into the tree), no deadline (a real model call
    takes what it takes on a busy 2-core machine), ``default_examples`` unless
    ``PADDLE_METER_FUZZ_EXAMPLES`` says otherwise."""
    wanted = os.environ.get("PADDLE_METER_FUZZ_EXAMPLES")
    return settings(
        max_examples=int(wanted) if wanted else default_examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        # no "explain": the failure message already names the input, shrunk
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
        **overrides,
    )


# --- the seed corpus ---------------------------------------------------------------------


def seed(name: str) -> bytes:
    """One file of tests/fuzz_corpus/ (``<target>--<what>.<ext>``)."""
    return (CORPUS_DIR / name).read_bytes()


def png(
    width: int, height: int, *, bit_depth: int = 8, color_type: int = 0, rows: bool = False
) -> bytes:
    """A PNG whose IHDR says ``width`` x ``height`` (CRCs correct). ``rows``: with all of its
    (zero) pixel rows compressed in the IDAT, a complete image; else a token IDAT, so the
    header promises far more than the file holds."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if rows:
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
        row = b"\x00" * (1 + (width * channels * bit_depth + 7) // 8)
        packer = zlib.compressobj(9)
        idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    else:
        idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(side: int = 20000) -> bytes:
    """A complete, valid 1-bit ``side`` x ``side`` PNG of a few dozen KB that decodes to
    ``side**2`` bytes of pixels (20000: 400 MB from 48 KB): above PIL's own bomb threshold,
    so a pixel check that trusts ``PIL.Image.open`` never sees its size."""
    return png(side, side, bit_depth=1, color_type=0, rows=True)


def _generated() -> dict[str, bytes]:
    """Known-bad seeds too big (or too regular) to keep as files."""
    return {
        "oip_json--deep-array.json": b"[" * 100_000,
        "oip_json--deep-object.json": b'{"inputs":' * 50_000 + b"[]" + b"}" * 50_000,
        "oip_json--huge-int-shape.json": (
            b'{"inputs":[{"name":"image","datatype":"BYTES","shape":['
            + b"9" * 5000
            + b'],"data":[]}]}'
        ),
        "pipeline_json--deep-array.json": b'{"key":' + b"[" * 100_000,
        "pipeline_json--deep-value.json": b'{"key":["image"],"value":'
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}",
        "image--huge-dims.png": png(2**31 - 1, 2**31 - 1),
        "image--zero-dims.png": png(0, 0),
        "image--bomb-header.png": png(30_000, 30_000),
    }


def seeds(prefix: str = "") -> dict[str, bytes]:
    """The corpus files and the generated known-bad seeds whose name starts with ``prefix``."""
    found = {
        p.name: p.read_bytes()
        for p in sorted(CORPUS_DIR.iterdir())
        if p.name.startswith(prefix) and "--" in p.name
    }
    found.update({k: v for k, v in _generated().items() if k.startswith(prefix)})
    return found


def binary_header_length(body: bytes) -> int:
    """The Inference-Header-Content-Length of a binary-extension body whose JSON header is
    ASCII (as the corpus's is): where its first JSON value ends."""
    _, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))
    return end


# --- strategies ----------------------------------------------------------------------------


def _mutations(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Truncations, byte flips, insertions and deletions of ``base``."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(base))
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(("truncate", "flip", "insert", "delete")))
            at = draw(st.integers(0, max(len(data), 1) - 1)) if data else 0
            if op == "truncate":
                del data[at:]
            elif op == "flip" and data:
                data[at] ^= draw(st.integers(1, 255))
            elif op == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            elif op == "delete" and data:
                del data[at : at + draw(st.integers(1, 16))]
        return bytes(data)

    return mutate()


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(seed("image--tiny.jpg"))
    at = data.find(b"\xff\xc0")  # SOF0: FF C0, length(2), precision(1), height(2), width(2)
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


_MAGICS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBP",
]


def malformed_images() -> st.SearchStrategy[bytes]:
    """Image file bytes a client could send by mistake or on purpose: random bytes, zero
    bytes, a real PNG/JPEG truncated or bit-flipped, a format's magic and garbage, headers
    claiming huge (or zero) dimensions, and now and then the real small image itself."""
    images = st.sampled_from([seed("image--tiny.png"), seed("image--tiny.jpg")])
    dims = st.integers(0, 2**31 - 1)
    return st.one_of(
        st.just(b""),
        st.binary(max_size=1024),
        _mutations(images),
        st.builds(lambda m, tail: m + tail, st.sampled_from(_MAGICS), st.binary(max_size=256)),
        st.builds(
            lambda w, h, depth: png(w, h, bit_depth=depth), dims, dims, st.sampled_from([1, 8, 16])
        ),
        st.builds(_jpeg_with_size, st.integers(0, 65535), st.integers(0, 65535)),
        images,
    )


def _huge_number_text() -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            "1e999",
            "-1e999",
            "9" * 5000,
            "-" + "9" * 400,
            "1" + "0" * 30,
            "18446744073709551616",
            "1.5",
            "-0",
        ]
    )


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value, with the awkward ones: NaN / Infinity (which ``json`` accepts), huge
    integers, floats, unicode (astral, combining, NUL, lone surrogates escaped)."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=24),
        st.sampled_from(
            ["image", "BYTES", "FP32", "INT8", "", "\x00", "\ud800", "图像", "e\u0301"]
        ),
    )

    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.lists(children, max_size=4) | st.dictionaries(
            st.text(max_size=8), children, max_size=4
        )

    return st.recursive(scalars, containers, max_leaves=max_leaves)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def oip_documents() -> st.SearchStrategy[dict[str, Any]]:
    """OIP v2 inference request objects with every field sometimes of the wrong type or range."""
    anything = json_values(6)
    image_data = st.one_of(
        st.builds(lambda b: [_b64(b)], malformed_images()),
        st.lists(st.one_of(st.text(max_size=12), anything), max_size=3),
        anything,
    )
    parameters = st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "binary_data_size": st.one_of(st.integers(-5, 2**70), anything),
                "binary_data": anything,
            },
        ),
        anything,
    )
    tensor = st.fixed_dictionaries(
        {},
        optional={
            "name": st.one_of(st.sampled_from(["image", "text", "text_pair"]), anything),
            "datatype": st.one_of(
                st.sampled_from(["BYTES", "FP32", "INT8", "UINT64", "BOOL", "FP16", "FOO"]),
                anything,
            ),
            "shape": st.one_of(
                st.lists(st.integers(-2, 2**70), max_size=4), st.just([1]), anything
            ),
            "data": image_data,
            "parameters": parameters,
        },
    )
    output = st.fixed_dictionaries(
        {},
        optional={
            "name": st.one_of(st.sampled_from(["text", "result"]), anything),
            "parameters": parameters,
        },
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "id": anything,
            "inputs": st.one_of(st.lists(st.one_of(tensor, anything), max_size=3), anything),
            "outputs": st.one_of(st.lists(st.one_of(output, anything), max_size=3), anything),
            "parameters": st.one_of(
                st.fixed_dictionaries({}, optional={"binary_data_output": anything}), anything
            ),
        },
    )


def pipeline_documents() -> st.SearchStrategy[dict[str, Any]]:
    """Pipeline (and /v1/tokenize) request objects with wrong types, NaN, huge logids."""
    anything = json_values(6)
    value = st.one_of(st.builds(_b64, malformed_images()), st.text(max_size=24), anything)
    return st.fixed_dictionaries(
        {},
        optional={
            "key": st.one_of(
                st.lists(
                    st.one_of(st.sampled_from(["image", "text", "text_pair"]), anything), max_size=3
                ),
                anything,
            ),
            "value": st.one_of(st.lists(value, max_size=3), anything),
            "logid": st.one_of(st.integers(-(2**70), 2**70), anything),
            "name": anything,
            "model": st.one_of(st.sampled_from(["ocr", "ernie"]), anything),
            "text": anything,
            "text_pair": anything,
        },
    )


def deep_json() -> st.SearchStrategy[bytes]:
    """Nesting far deeper than any request needs (closed or not): the RecursionError case."""
    return st.builds(
        lambda depth, opener, closed, head: (
            head + opener * depth + (_CLOSE[opener] * depth if closed else b"")
        ),
        st.integers(1, 150_000),
        st.sampled_from([b"[", b'{"a":']),
        st.booleans(),
        st.sampled_from([b"", b'{"inputs":', b'{"key":["image"],"value":']),
    )


_CLOSE = {b"[": b"]", b'{"a":': b"}"}


def _dump(document: Any) -> bytes:
    # allow_nan: NaN / Infinity are what a sloppy client's json library really sends
    return json.dumps(document, allow_nan=True).encode()


def malformed_json_bodies(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Request bodies: ``documents`` serialised, any JSON, deep nesting, huge numbers as
    text, invalid UTF-8, other encodings (UTF-16 / BOM), and mutations of the corpus JSON."""
    corpus_json = st.sampled_from(
        [v for k, v in seeds().items() if k.endswith(".json") and len(v) < 10_000]
    )
    return st.one_of(
        st.builds(_dump, documents),
        st.builds(_dump, json_values()),
        deep_json(),
        st.builds(
            lambda n: (
                b'{"inputs":[{"name":"image","datatype":"BYTES","shape":['
                + n.encode()
                + b'],"data":["eA=="]}]}'
            ),
            _huge_number_text(),
        ),
        st.builds(
            lambda d, enc: json.dumps(d, allow_nan=True).encode(enc),
            documents,
            st.sampled_from(["utf-16", "utf-32", "utf-8-sig"]),
        ),
        st.builds(lambda raw: b'{"inputs": "' + raw + b'"}', st.binary(max_size=64)),
        _mutations(corpus_json),
        st.binary(max_size=256),
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def _wire_fields(draw: st.DrawFn) -> bytes:
    """Well-framed protobuf wire fields with arbitrary numbers, wire types and payloads:
    wrong types for known fields, invalid UTF-8 in strings, bogus lengths, groups."""
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        number = draw(st.integers(1, 20) | st.integers(1, 2**29 - 1))
        wire = draw(st.integers(0, 7))
        parts.append(_varint(number << 3 | wire))
        if wire == 0:
            parts.append(_varint(draw(st.integers(0, 2**64 - 1))))
        elif wire == 1:
            parts.append(draw(st.binary(min_size=8, max_size=8)))
        elif wire == 2:
            payload = draw(st.binary(max_size=64))
            length = draw(st.sampled_from([len(payload), len(payload) + 1, 2**31, 0]))
            parts.append(_varint(length) + payload)
        elif wire == 5:
            parts.append(draw(st.binary(min_size=4, max_size=4)))
        else:  # groups (3/4) and the undefined 6/7
            parts.append(draw(st.binary(max_size=8)))
    return b"".join(parts)


def malformed_protobuf() -> st.SearchStrategy[bytes]:
    """Request bytes for a gRPC method: random, mutated real requests, odd wire fields."""
    real = st.sampled_from([v for k, v in seeds().items() if k.endswith(".pb")])
    return st.one_of(st.binary(max_size=256), _mutations(real), _wire_fields(), real)


def http_header_values() -> st.SearchStrategy[bytes]:
    """Header value bytes HTTP/1.1 can carry on the wire (no CR / LF): long, control
    characters, obs-text (latin-1), UTF-8, and near-valid ids and traceparents."""
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64)
    return st.one_of(
        st.builds(str.encode, printable),
        st.builds(lambda n: b"a" * n, st.integers(129, 20_000)),
        st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.builds(lambda t: t.encode("utf-8", "surrogatepass"), st.text(max_size=40)),
        st.sampled_from(
            [
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                b"00-00000000000000000000000000000000-0000000000000000-01",
                b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-" + b"x" * 600,
                b"req-1",
                b"tenant-a",
                b"a" * 128,  # the longest request id accepted
                b"t" * 64,  # the longest tenant accepted
                b"t" * 65,
                b"\x00",
                b"\x7f",
                b"\t",
                b" ",
                b"",
            ]
        ),
    )


def grpc_metadata_values() -> st.SearchStrategy[str]:
    """Metadata values gRPC lets a client send (printable ASCII only): long, near-valid.

    At most 1400 characters each, so five of them stay under gRPC's 8 KiB metadata soft
    limit: over it the transport refuses the call itself (RESOURCE_EXHAUSTED), at random
    between the soft and the hard limit, which would make the outcome flaky."""
    printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    return st.one_of(
        st.text(printable, max_size=64),
        st.builds(lambda n: "a" * n, st.integers(129, 1400)),
        st.text(printable, min_size=129, max_size=1400),
        st.sampled_from(
            [
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "00-00000000000000000000000000000000-0000000000000000-01",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-" + "x" * 600,
                "req-1",
                "tenant-a",
                "a" * 128,
                "t" * 64,
                "t" * 65,
                " ",
                "",
            ]
        ),
    )


# --- senders and checks ------------------------------------------------------------------


class Outcome:
    """What one fuzzed call got back, whatever the surface, for one assertion message."""

    __slots__ = ("surface", "status", "detail", "err_no")

    def __init__(
        self, surface: str, status: Any, detail: str = "", err_no: int | None = None
    ) -> None:
        self.surface = surface
        self.status = status
        self.detail = detail
        self.err_no = err_no

    def __repr__(self) -> str:
        err = f" err_no={self.err_no}" if self.err_no is not None else ""
        return f"{self.surface}: {self.status}{err} {self.detail[:300]!r}"


def _err_no(body: bytes) -> int | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document.get("err_no") if isinstance(document, dict) else None


def check_http(surface: str, status: int, body: bytes, what: Any) -> Outcome:
    """Assert an HTTP answer is not a server failure; returns it as an Outcome."""
    outcome = Outcome(surface, status, body.decode("utf-8", "replace"), _err_no(body))
    assert status != 0, f"no HTTP response at all for {what!r}: {outcome}"
    assert status < 500 or status in DOCUMENTED_5XX, f"server error for {what!r}: {outcome}"
    assert outcome.err_no != PIPELINE_INTERNAL_ERR_NO, (
        f"pipeline internal error for {what!r}: {outcome}"
    )
    return outcome


def check_grpc(surface: str, call: Callable[[], Any], what: Any) -> Outcome:
    """Run a gRPC ``call``; assert it did not fail UNKNOWN / INTERNAL (or, for a pipeline
    Response, with err_no 10000); returns what happened."""
    try:
        reply = call()
    except grpc.RpcError as exc:
        outcome = Outcome(surface, exc.code(), exc.details() or "")
        assert exc.code() not in FORBIDDEN_GRPC, f"server error for {what!r}: {outcome}"
        return outcome
    err_no = None
    if isinstance(reply, bytes) and surface.startswith("pipeline"):
        try:
            err_no = pipeline_pb.Response.FromString(reply).err_no
        except Exception:  # not a Response: the method was another one
            err_no = None
    elif isinstance(reply, pipeline_pb.Response):
        err_no = reply.err_no
    outcome = Outcome(surface, grpc.StatusCode.OK, "", err_no)
    assert err_no != PIPELINE_INTERNAL_ERR_NO, f"pipeline internal error for {what!r}: {outcome}"
    return outcome


def grpc_unary_methods() -> list[str]:
    """Every unary method path of the services the server registers (OIP, pipeline, health)."""
    from grpc_health.v1 import health_pb2

    services = [
        service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        pipeline_pb.DESCRIPTOR.services_by_name["PipelineService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ]
    return [
        f"/{service.full_name}/{method.name}"
        for service in services
        for method in service.methods
        if not method.client_streaming and not method.server_streaming
    ]


def raw_http(
    port: int,
    path: str,
    body: bytes = b"",
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    method: bytes = b"POST",
    chunks: Iterable[bytes] | None = None,
) -> tuple[int, Mapping[bytes, bytes], bytes]:
    """One HTTP/1.1 request written byte for byte (header values no client library would
    send; a chunked body), on a fresh connection; returns (status, headers, body); status 0
    when the server closed without answering."""
    lines = [
        method + b" " + path.encode() + b" HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Connection: close",
        b"Content-Type: application/json",
    ]
    lines += [name + b": " + value for name, value in headers]
    if chunks is None:
        lines.append(b"Content-Length: " + str(len(body)).encode())
        payload = body
    else:
        lines.append(b"Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        # The server may answer (413) and close before reading all of the body.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + payload)
        received = bytearray()
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return 0, {}, bytes(received)
    answer_headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        answer_headers[name.strip().lower()] = value.strip()
    return int(parts[1]), answer_headers, rest


def http_client(base_url: str) -> httpx.Client:
    """A keep-alive client for many fuzzed calls (generous timeout: OCR on 2 busy cores)."""
    return httpx.Client(base_url=base_url, timeout=120)
