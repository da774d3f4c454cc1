"""Fuzzing the live server: hypothesis and schemathesis against one real ``paddle-meter serve``
(serving OCR and the demo ERNIE), over all four surfaces: OIP v2 gRPC, OIP v2 REST (JSON and
Triton's binary extension), the pipeline over gRPC and over HTTP.

Every surface gets malformed input of the kind that crashed requests before issue 9: images
(random, truncated, bit-flipped, huge or zero dimensions, a decompression bomb), JSON bodies
(wrong types, NaN, huge numbers, unicode, deep nesting, other encodings), protobuf bytes on
every unary gRPC method (through a raw channel with identity serializers, so nothing
client-side checks them), header values (long, control characters and latin-1 over raw
HTTP/1.1, unicode; printable-only over gRPC, which allows no more), chunked bodies around
the size limit, and the HTTP app's OpenAPI through schemathesis. The property everywhere:
no 5xx but the documented 503 / 504, no gRPC UNKNOWN / INTERNAL, no pipeline err_no 10000,
a malformed x-request-id / x-tenant / OIP id refused and never echoed; a good call still
succeeds at the end of each test, and the server logs no traceback.

Derandomized and bounded (tests/support/fuzzing.py): the same cases on every run;
``PADDLE_METER_FUZZ_EXAMPLES=N`` for a longer hunt. The seed corpus (tests/fuzz_corpus/) is
replayed as is, mutated by the strategies, and sent as bodies through schemathesis.
"""
from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from imaging import CORPUS, same_text
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from support import fuzzing as fz
from support.server import ServerProcess
from tritonclient.grpc import service_pb2

from interceptors.request_id import REQUEST_ID_PATTERN, TENANT_PATTERN
from serving.proto import pipeline_service_pb2 as pipeline_pb

MAX_BYTES = 2_000_000
MAX_PIXELS = 3_000_000
OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"
PIPELINE_INFER = "/baidu.paddle_serving.pipeline_serving.PipelineService/inference"
SURFACES = ["oip_grpc", "oip_http_json", "oip_http_binary", "pipeline_grpc", "pipeline_http"]
_HEADER_LENGTH = "Inference-Header-Content-Length"
OIP_PATHS = ["/v2/models/ocr/infer", "/v2/models/ernie/infer"]
PIPELINE_PATHS = ["/ocr/prediction", "/ernie/prediction", "/ernie/tokenize"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    # OCR and the (untrained) demo ERNIE: image and text codecs, and a model that tokenizes.
    workdir = tmp_path_factory.mktemp("fuzz")
    demo = workdir / "ernie-demo"
    exe = str(Path(sys.executable).with_name("paddle-meter"))
    subprocess.run(
        [exe, "models", "make-demo-ernie", str(demo)], check=True, capture_output=True, timeout=600
    )
    config = {
        "server": {"max_message_bytes": MAX_BYTES},
        "models": {
            "ocr": {"kind": "ocr", "options": {"max_image_pixels": MAX_PIXELS}},
            "ernie": {"kind": "ernie", "options": {"model_dir": str(demo), "max_seq_len": 64}},
        },
    }
    with ServerProcess(workdir, config) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with fz.http_client(server.http_url) as client:
        yield client


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    options = [
        ("grpc.max_send_message_length", 4 * MAX_BYTES),
        ("grpc.max_receive_message_length", 4 * MAX_BYTES),
    ]
    with grpc.insecure_channel(server.grpc_address, options=options) as chan:
        yield chan


def _raw_call(channel: grpc.Channel, method: str, data: bytes, metadata=()) -> bytes:
    # No serializers: the bytes go out exactly as given, the reply comes back as bytes.
    return channel.unary_unary(method)(data, timeout=120, metadata=metadata)


def ocr_request(surface: str, image: bytes) -> tuple[str, bytes, dict[str, str]]:
    """The OCR request for ``image`` on ``surface``: (HTTP path or gRPC method, the bytes to
    send, HTTP headers)."""
    b64 = base64.b64encode(image).decode()
    if surface == "oip_grpc":
        request = service_pb2.ModelInferRequest(model_name="ocr")
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
        return OIP_INFER, request.SerializeToString(), {}
    if surface == "pipeline_grpc":
        request = pipeline_pb.Request(key=["image"], value=[b64], name="ocr")
        return PIPELINE_INFER, request.SerializeToString(), {}
    if surface == "pipeline_http":
        return "/ocr/prediction", json.dumps({"key": ["image"], "value": [b64]}).encode(), {}
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}
    if surface == "oip_http_json":
        return "/v2/models/ocr/infer", json.dumps({"inputs": [tensor]}).encode(), {}
    # Triton's binary extension: a JSON header, then the element length-prefixed.
    raw = struct.pack("<I", len(image)) + image
    del tensor["data"]
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor]}).encode()
    return "/v2/models/ocr/infer", header + raw, {_HEADER_LENGTH: str(len(header))}


def _call(surface: str, image: bytes, http: httpx.Client, channel: grpc.Channel):
    """Send the OCR request; a function that does it and returns the reply (raw bytes for
    gRPC, the httpx.Response for HTTP), so the check can run it."""
    target, body, headers = ocr_request(surface, image)
    if surface.endswith("grpc"):
        return lambda: _raw_call(channel, target, body)
    return lambda: http.post(target, content=body, headers=headers)


def send_image(surface: str, image: bytes, http: httpx.Client, channel: grpc.Channel) -> fz.Outcome:
    """Send ``image`` as an OCR request on ``surface``; assert the answer is no server failure."""
    call = _call(surface, image, http, channel)
    if surface.endswith("grpc"):
        return fz.check_grpc(surface, call, image)
    reply = call()
    return fz.check_http(surface, reply.status_code, reply.content, image)


def assert_good_call(surface: str, http: httpx.Client, channel: grpc.Channel) -> None:
    """A real invoice on ``surface`` is still read correctly (and, over HTTP, ERNIE still
    answers): the fuzzing broke nothing."""
    item = CORPUS["cjk_invoice"]
    reply = _call(surface, item.data, http, channel)()
    if surface == "oip_grpc":
        response = service_pb2.ModelInferResponse.FromString(reply)
        index = [o.name for o in response.outputs].index("text")
        text = response.raw_output_contents[index][4:].decode()
    elif surface == "pipeline_grpc":
        response = pipeline_pb.Response.FromString(reply)
        assert response.err_no == 0, response.err_msg
        text = eval(response.value[0])[0][0]  # noqa: S307 - the reference client's own parsing
    else:
        assert reply.status_code == 200, reply.text
        if surface == "pipeline_http":
            assert reply.json()["err_no"] == 0, reply.text
            text = eval(reply.json()["value"][0])[0][0]  # noqa: S307
        else:  # REST outputs come as JSON data unless asked for binary: neither request asks
            (output,) = [o for o in reply.json()["outputs"] if o["name"] == "text"]
            text = output["data"][0]
        answer = http.post("/ernie/prediction", json={"key": ["text"], "value": ["still served"]})
        assert answer.status_code == 200 and answer.json()["err_no"] == 0, answer.text
    assert same_text(text, item.lines[0]), (surface, text)


def test_seed_corpus_is_served(server, http, channel):
    """The valid seeds are real requests (so mutations start from something that works)."""
    for surface in SURFACES:
        outcome = send_image(surface, fz.seed("image--tiny.png"), http, channel)
        assert outcome.status in (200, grpc.StatusCode.OK) and outcome.err_no in (None, 0), outcome
    reply = http.post(OIP_PATHS[0], content=fz.seed("oip_json--valid.json"))
    assert reply.status_code == 200, reply.text
    body = fz.seed("oip_binary--valid.body")
    headers = {_HEADER_LENGTH: str(fz.binary_header_length(body))}
    reply = http.post(OIP_PATHS[0], content=body, headers=headers)
    assert reply.status_code == 200, reply.text
    reply = http.post("/ocr/prediction", content=fz.seed("pipeline_json--valid.json"))
    assert reply.json()["err_no"] == 0, reply.text
    raw = _raw_call(channel, OIP_INFER, fz.seed("oip_grpc--valid.pb"))
    assert service_pb2.ModelInferResponse.FromString(raw).outputs
    raw = _raw_call(channel, PIPELINE_INFER, fz.seed("pipeline_grpc--valid.pb"))
    assert pipeline_pb.Response.FromString(raw).err_no == 0


def _replay(
    name: str, data: bytes, http: httpx.Client, channel: grpc.Channel
) -> Iterator[Callable[[], fz.Outcome]]:
    """The calls that send one corpus seed everywhere it means something, each checking its
    answer when called."""
    target = name.split("--", 1)[0]
    if target == "image":
        for surface in SURFACES:
            yield lambda surface=surface: send_image(surface, data, http, channel)
    elif target in ("oip_json", "oip_binary", "pipeline_json"):
        paths = OIP_PATHS if target.startswith("oip") else [*PIPELINE_PATHS, "/v1/tokenize"]
        headers = {}
        if target == "oip_binary":
            headers[_HEADER_LENGTH] = str(fz.binary_header_length(data))
        for path in paths:

            def post(path: str = path) -> fz.Outcome:
                reply = http.post(path, content=data, headers=headers)
                return fz.check_http(path, reply.status_code, reply.content, name)

            yield post
    else:
        method = OIP_INFER if target == "oip_grpc" else PIPELINE_INFER
        yield lambda: fz.check_grpc(target, lambda: _raw_call(channel, method, data), name)


def test_corpus_replayed_on_every_surface(server, http, channel):
    """Every seed, the known-bad ones included, on every surface it applies to; all failures
    reported together (a hypothesis test stops at its first)."""
    failures = []
    for name, data in fz.seeds().items():
        for call in _replay(name, data, http, channel):
            try:
                call()
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
    assert not failures, f"{len(failures)} seed answers were server errors:\n" + "\n".join(failures)
    for surface in SURFACES:
        assert_good_call(surface, http, channel)


@pytest.mark.parametrize("surface", SURFACES)
def test_malformed_images(server, http, channel, surface):
    @fz.fuzz_settings(25)
    @given(image=fz.malformed_images())
    def fuzz(image: bytes) -> None:
        send_image(surface, image, http, channel)

    fuzz()
    assert_good_call(surface, http, channel)


def test_image_bomb_is_refused_before_it_is_decoded(server, http, channel):
    """A 48 KB PNG that decodes to 400 MB of pixels must be refused from its header (413 /
    RESOURCE_EXHAUSTED), not decoded first: the server's peak memory may not grow by it."""
    bomb = fz.png_bomb(20_000)
    status = f"/proc/{server.proc.pid}/status"

    def peak_mib() -> int:
        with open(status, encoding="ascii") as lines:
            (peak,) = [line for line in lines if line.startswith("VmHWM:")]
        return int(peak.split()[1]) // 1024

    with open(f"/proc/{server.proc.pid}/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")  # reset the peak RSS to the current RSS
    before = peak_mib()
    outcome = send_image("oip_grpc", bomb, http, channel)
    grown = peak_mib() - before
    assert outcome.status == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    assert grown < 150, (
        f"peak RSS grew by {grown} MiB for a {len(bomb)} byte request: decoded before the pixel check"
    )
    assert_good_call("oip_grpc", http, channel)


JSON_TARGETS = {
    "oip": (OIP_PATHS, fz.oip_documents()),
    "oip_binary": (OIP_PATHS, fz.oip_documents()),
    "pipeline": (PIPELINE_PATHS, fz.pipeline_documents()),
    "tokenize": (["/v1/tokenize"], fz.pipeline_documents()),
}


@pytest.mark.parametrize("target", JSON_TARGETS)
def test_malformed_json_bodies(server, http, channel, target):
    paths, documents = JSON_TARGETS[target]
    valid = fz.seed("oip_binary--valid.body")
    binary_tails = st.one_of(
        st.just(b""), st.binary(max_size=64), st.just(valid[fz.binary_header_length(valid) :])
    )
    header_lengths = st.one_of(
        st.none(),
        st.integers(-5, 2**64),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12),
    )

    @fz.fuzz_settings(40)
    @given(
        path=st.sampled_from(paths),
        body=fz.malformed_json_bodies(documents),
        tail=binary_tails,
        header_length=header_lengths,
    )
    def fuzz(path: str, body: bytes, tail: bytes, header_length) -> None:
        headers = {}
        if target == "oip_binary":
            # Triton's extension: the JSON is a header of N bytes, binary tensors follow.
            header_length = len(body) if header_length is None else header_length
            headers[_HEADER_LENGTH] = str(header_length)
            body += tail
        reply = http.post(path, content=body, headers=headers)
        fz.check_http(path, reply.status_code, reply.content, (body[:400], headers))
        if target == "oip" and reply.status_code == 200:
            # The OIP "id" keys the bill like x-request-id: malformed, it is refused.
            request_id = json.loads(body).get("id")
            if request_id and not isinstance(request_id, bool):
                assert REQUEST_ID_PATTERN.fullmatch(str(request_id)), ("served", request_id)

    fuzz()
    assert_good_call(
        "pipeline_http" if target in ("pipeline", "tokenize") else "oip_http_json", http, channel
    )


def test_every_unary_method_answers_an_empty_request(server, http, channel):
    """Zero bytes are a valid (empty) message of every type: each method, the ones beyond
    the OIP core that answer UNIMPLEMENTED included, answers without a server failure and
    without logging a traceback (anyone could fill the log with them)."""
    start = len(server.logs())
    for method in fz.grpc_unary_methods():
        surface = "pipeline_grpc" if "PipelineService" in method else "oip_grpc"
        fz.check_grpc(surface, lambda method=method: _raw_call(channel, method, b""), method)
    assert "Traceback" not in server.logs()[start:], server.logs()[start:][-4000:]
    assert_good_call("oip_grpc", http, channel)


@pytest.mark.parametrize("service", ["GRPCInferenceService", "PipelineService", "Health"])
def test_malformed_protobuf_on_every_unary_method(server, http, channel, service):
    methods = [m for m in fz.grpc_unary_methods() if f".{service}/" in m]
    assert methods, service

    @fz.fuzz_settings(20 * min(len(methods), 3))
    @given(method=st.sampled_from(methods), data=fz.malformed_protobuf())
    def fuzz(method: str, data: bytes) -> None:
        surface = "pipeline_grpc" if service == "PipelineService" else "oip_grpc"
        fz.check_grpc(surface, lambda: _raw_call(channel, method, data), (method, data))

    fuzz()
    assert_good_call("oip_grpc", http, channel)
    assert_good_call("pipeline_grpc", http, channel)


_HEADER_NAMES = ["x-request-id", "x-tenant", "traceparent", "tracestate", "baggage"]


def _check_header_policy(
    sent: dict, answered_id: str | None, outcome: fz.Outcome, refused: tuple
) -> None:
    """docs/design.md's header policy: a malformed x-request-id or x-tenant is refused
    (``refused``: HTTP 400, or 431 from the HTTP parser / INVALID_ARGUMENT), never replaced; the server answers a request
    id only when it is one it accepts, and never sends back (in a header or the body) a
    tenant or trace header value it was given."""

    def received(name: str) -> str | None:
        # What the server's metering sees: HTTP parsers drop blanks around a value.
        value = sent.get(name)
        if value is None:
            return None
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        return text.strip(" \t") if isinstance(value, bytes) else text

    request_id, tenant = received("x-request-id"), received("x-tenant")
    if request_id is not None and not REQUEST_ID_PATTERN.fullmatch(request_id):
        assert outcome.status in refused, ("a malformed x-request-id was not refused", outcome)
    if tenant is not None and not TENANT_PATTERN.fullmatch(tenant.strip()):
        assert outcome.status in refused, ("a malformed x-tenant was not refused", outcome)
    if answered_id is not None:
        assert REQUEST_ID_PATTERN.fullmatch(answered_id), (answered_id, outcome)
    accepted_id = request_id if request_id and REQUEST_ID_PATTERN.fullmatch(request_id) else None
    for name, value in sent.items():
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if text == accepted_id:  # the one value the server may send back
            continue
        if len(text) >= 12:  # shorter ones could match anything by chance
            assert text != answered_id, (name, outcome)
            assert text not in outcome.detail, (name, outcome)


@pytest.mark.parametrize("surface", ["oip_http_json", "pipeline_http"])
def test_malformed_headers_over_http(server, http, channel, surface):
    path, body, _ = ocr_request(surface, fz.seed("image--tiny.png"))

    @fz.fuzz_settings(30)
    @given(
        headers=st.dictionaries(st.sampled_from(_HEADER_NAMES), fz.http_header_values(), min_size=1)
    )
    def fuzz(headers: dict[str, bytes]) -> None:
        status, answer_headers, content = fz.raw_http(
            server.http_port, path, body, [(k.encode(), v) for k, v in headers.items()]
        )
        outcome = fz.check_http(path, status, content, headers)
        answered = answer_headers.get(b"x-request-id")
        answered_id = answered.decode("latin-1") if answered is not None else None
        _check_header_policy(headers, answered_id, outcome, (400, 431))

    fuzz()
    assert_good_call(surface, http, channel)


@pytest.mark.parametrize("surface", ["oip_grpc", "pipeline_grpc"])
def test_malformed_metadata_over_grpc(server, http, channel, surface):
    method, data, _ = ocr_request(surface, fz.seed("image--tiny.png"))

    @fz.fuzz_settings(30)
    @given(
        metadata=st.dictionaries(
            st.sampled_from(_HEADER_NAMES), fz.grpc_metadata_values(), min_size=1
        )
    )
    def fuzz(metadata: dict[str, str]) -> None:
        call = channel.unary_unary(method).with_call
        answered: list[str | None] = [None]

        def invoke() -> bytes:
            try:
                reply, state = call(data, timeout=120, metadata=list(metadata.items()))
            except grpc.RpcError as exc:
                answered[0] = dict(exc.trailing_metadata() or ()).get("x-request-id")
                raise
            meta = dict(state.initial_metadata() or ()) | dict(state.trailing_metadata() or ())
            answered[0] = meta.get("x-request-id")
            return reply

        outcome = fz.check_grpc(surface, invoke, metadata)
        _check_header_policy(metadata, answered[0], outcome, (grpc.StatusCode.INVALID_ARGUMENT,))

    fuzz()
    assert_good_call(surface, http, channel)


@pytest.mark.parametrize("surface", ["oip_http_json", "pipeline_http"])
def test_chunked_bodies_around_the_size_limit(server, http, channel, surface):
    """No Content-Length: the limit must hold on the bytes as they arrive (413, never 500)."""
    path, _, _ = ocr_request(surface, b"")

    @fz.fuzz_settings(8)
    @given(
        sizes=st.lists(
            st.sampled_from([0, 1, 4096, 65536, 700_000, MAX_BYTES // 2, MAX_BYTES + 1]),
            min_size=1,
            max_size=5,
        )
    )
    def fuzz(sizes: list[int]) -> None:
        chunks = [b"x" * n for n in sizes]  # not JSON: under the limit it is a plain 400
        status, _, content = fz.raw_http(server.http_port, path, chunks=chunks)
        outcome = fz.check_http(path, status, content, sizes)
        if sum(sizes) > MAX_BYTES:
            assert status == 413, outcome

    fuzz()
    assert_good_call(surface, http, channel)


def _documented_statuses_only(ctx, response, case) -> None:
    """schemathesis check: a 5xx is a failure unless it is the documented 503 / 504."""
    status = response.status_code
    if status >= 500 and status not in fz.DOCUMENTED_5XX:
        raise AssertionError(
            f"{case.operation.label}: HTTP {status} {response.content[:300]!r}\n{case.as_curl_command()}"
        )


def test_openapi_with_schemathesis(server, http, channel):
    schema = schemathesis.openapi.from_url(f"{server.http_url}/openapi.json")
    cases = st.one_of(
        schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
        schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @fz.fuzz_settings(100)
    @given(case=cases)
    def fuzz(case) -> None:
        response = case.call(base_url=server.http_url, timeout=120)
        case.validate_response(response, checks=[_documented_statuses_only])

    fuzz()
    assert_good_call("oip_http_json", http, channel)
    assert_good_call("pipeline_http", http, channel)


def test_openapi_operations_with_corpus_bodies(server, http, channel):
    """The app's OpenAPI declares no request bodies (the handlers read raw bytes), so
    schemathesis never generates one: here its cases carry the corpus's JSON bodies to every
    POST operation, through its own transport and the same check."""
    schema = schemathesis.openapi.from_url(f"{server.http_url}/openapi.json")
    bodies = {k: v for k, v in fz.seeds().items() if k.endswith((".json", ".body"))}
    posts = [r.ok() for r in schema.get_all_operations() if r.ok().method.upper() == "POST"]
    assert {op.path for op in posts} >= {
        "/v2/models/{name}/infer",
        "/v1/tokenize",
        "/{name}/{method}",
    }
    failures = []
    for operation in posts:
        for model in ("ocr", "ernie"):
            params = {"name": model, "version": "1", "method": "prediction",
                      "key_id": "nosuchkey000"}
            wanted = {p: params[p] for p in re.findall(r"{(\w+)}", operation.path)}
            for name, body in bodies.items():
                case = operation.Case(
                    path_parameters=wanted, body=body, media_type="application/octet-stream"
                )
                response = case.call(base_url=server.http_url, timeout=120)
                try:
                    case.validate_response(response, checks=[_documented_statuses_only])
                except FailureGroup as exc:  # our check's own line, not the whole report
                    failures += [
                        f"{name}: {getattr(f, 'message', f)}".splitlines()[0]
                        for f in exc.exceptions
                    ]
    assert not failures, "\n".join(failures)
    assert_good_call("oip_http_json", http, channel)


def test_server_logged_no_traceback(server):
    """Last in the module: after all of the above, the server's log holds no traceback (an
    exception a handler swallowed or answered is still a bug the answers above cannot see)."""
    logs = server.logs()
    at = logs.find("Traceback (most recent call last)")
    assert at < 0, logs[max(0, at - 1500) : at + 3000]
