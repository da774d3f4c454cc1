"""Real clients of the four metered surfaces that retry their own request ids, and the
ledger check that what each client was told is exactly what was billed.

Shared by the integrity tests (tests/test_integrity_*.py) and the soak (bench/bench_soak.py):

- `Endpoint`: where the server now runs; swapped when a killed server is replaced.
- `SurfaceClient`: one client's connections (an ``httpx.Client`` and a gRPC channel) and
  ``call(surface, request_id, image)`` on OIP gRPC, OIP HTTP, pipeline gRPC or pipeline
  HTTP, answering an `Outcome`: served (with the usage the caller was told), retryable
  (connection cut, UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, 503 / 504,
  pipeline err_no 3001 / 6000) or a final refusal.
- `call_until_settled`: retry the same id (same payload) until served or finally refused.
- `LoadClient`: a client thread doing that with fresh ids until stopped, optionally mixing
  in bad calls (undecodable image, unknown model, a billed id reused for another payload),
  keeping every attempt and what it was told.
- `billed_ok_rows` / `ledger_discrepancies`: read the ledger's billed (``status = 'ok'``)
  rows per (tenant, request_id) from SQLite or PostgreSQL and compare them with what the
  clients were told: lost, doubled, unexpected and wrongly counted keys.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import random
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Mapping

import grpc
import httpx
import psycopg
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from serving.proto import pipeline_service_pb2 as pipeline_pb
from serving.proto import pipeline_service_pb2_grpc as pipeline_grpc

__all__ = [
    "SURFACES",
    "Endpoint",
    "Outcome",
    "LoadClient",
    "SurfaceClient",
    "billed_ok_rows",
    "call_until_settled",
    "ledger_discrepancies",
]

SURFACES = ("oip_grpc", "oip_http", "pipeline_grpc", "pipeline_http")
# What a client may retry with the same id: the call was cut off or refused before it was
# served (overload, a restart, the ledger unable to accept records), or timed out; a retry
# of a call that was in fact billed is answered as a replay of the billed record.
_RETRY_GRPC = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
_RETRY_HTTP = {429, 502, 503, 504}
_RETRY_ERR_NO = {3001, 6000}  # pipeline CLOSED_ERROR (unavailable, overloaded), TIMEOUT
# A killed server must be reachable again as soon as its replacement listens: gRPC's
# default reconnect backoff grows to 120 s.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One attempt as the client saw it.

    ``status`` names the answer for counting: ``ok``, ``http 409``, ``grpc UNAVAILABLE``,
    ``err_no 3001``, ``conn ConnectError``. ``input_tokens`` / ``output_tokens`` are what the
    caller was told (x-usage-* headers or trailers) when ``ok``; ``replay`` is
    ``x-usage-replay: true``.
    """

    status: str
    ok: bool
    retryable: bool
    seconds: float
    input_tokens: int | None = None
    output_tokens: int | None = None
    replay: bool = False
    message: str = ""


class Endpoint:
    """The server clients talk to now; `set` it when a killed server is replaced."""

    def __init__(self, http_url: str = "", grpc_address: str = "") -> None:
        self._lock = threading.Lock()
        self._value = (http_url, grpc_address)

    def set(self, http_url: str, grpc_address: str) -> None:
        with self._lock:
            self._value = (http_url, grpc_address)

    def get(self) -> tuple[str, str]:
        with self._lock:
            return self._value


def _told(metadata: Mapping[str, str], key: str) -> int | None:
    value = metadata.get(key)
    return int(value) if value is not None else None


def _served(metadata: Mapping[str, str], began: float) -> Outcome:
    return Outcome(
        "ok",
        ok=True,
        retryable=False,
        seconds=time.monotonic() - began,
        input_tokens=_told(metadata, "x-usage-input-tokens"),
        output_tokens=_told(metadata, "x-usage-output-tokens"),
        replay=metadata.get("x-usage-replay", "").lower() == "true",
    )


class SurfaceClient:
    """One client's connections to `endpoint`, rebuilt when the endpoint moves.

    Not thread-safe: one per client thread. ``timeout_s`` bounds each attempt.
    """

    def __init__(self, endpoint: Endpoint, *, timeout_s: float = 60.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._at: tuple[str, str] | None = None
        self._http: httpx.Client | None = None
        self._channel: grpc.Channel | None = None

    def _connect(self) -> tuple[httpx.Client, grpc.Channel, str]:
        at = self.endpoint.get()
        if at != self._at or self._http is None or self._channel is None:
            self.close()
            self._http = httpx.Client(base_url=at[0], timeout=self.timeout_s)
            self._channel = grpc.insecure_channel(at[1], options=_CHANNEL_OPTIONS)
            self._at = at
        return self._http, self._channel, at[0]

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._channel is not None:
            self._channel.close()
        self._http = self._channel = self._at = None

    def __enter__(self) -> SurfaceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        surface: str,
        request_id: str,
        image: bytes,
        *,
        tenant: str | None = None,
        model: str = "ocr",
    ) -> Outcome:
        """One attempt on ``surface`` (one of `SURFACES`); never raises for a refusal."""
        headers = {"x-request-id": request_id}
        if tenant is not None:
            headers["x-tenant"] = tenant
        http, channel, _ = self._connect()
        began = time.monotonic()
        try:
            return _CALLS[surface](self, http, channel, model, image, headers, began)
        except grpc.RpcError as exc:
            code = exc.code()
            return Outcome(
                f"grpc {code.name}",
                ok=False,
                retryable=code in _RETRY_GRPC,
                seconds=time.monotonic() - began,
                message=str(exc.details())[:200],
            )
        except httpx.TransportError as exc:
            # Killed mid-call or not listening yet: the pooled connections are stale.
            self.close()
            return Outcome(
                f"conn {type(exc).__name__}",
                ok=False,
                retryable=True,
                seconds=time.monotonic() - began,
                message=str(exc)[:200],
            )

    # one method per surface -------------------------------------------------------------
    def _oip_grpc(self, http, channel, model, image, headers, began) -> Outcome:
        request = oip_pb.ModelInferRequest(
            model_name=model,
            inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
            raw_input_contents=[struct.pack("<I", len(image)) + image],
        )
        _, call = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            request, metadata=list(headers.items()), timeout=self.timeout_s
        )
        return _served(dict(call.trailing_metadata() or ()), began)

    def _oip_http(self, http, channel, model, image, headers, began) -> Outcome:
        body = {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(image).decode()],
                }
            ]
        }
        reply = http.post(f"/v2/models/{model}/infer", json=body, headers=headers)
        return _http_outcome(reply, began, pipeline=False)

    def _pipeline_grpc(self, http, channel, model, image, headers, began) -> Outcome:
        request = pipeline_pb.Request(
            key=["image"], value=[base64.b64encode(image).decode()], name=model
        )
        reply, call = pipeline_grpc.PipelineServiceStub(channel).inference.with_call(
            request, metadata=list(headers.items()), timeout=self.timeout_s
        )
        if reply.err_no != 0:
            return _err_no_outcome(reply.err_no, reply.err_msg, began)
        return _served(dict(call.trailing_metadata() or ()), began)

    def _pipeline_http(self, http, channel, model, image, headers, began) -> Outcome:
        body = {"key": ["image"], "value": [base64.b64encode(image).decode()]}
        reply = http.post(f"/{model}/prediction", json=body, headers=headers)
        return _http_outcome(reply, began, pipeline=True)


_CALLS: dict[str, Callable[..., Outcome]] = {
    name: getattr(SurfaceClient, f"_{name}") for name in SURFACES
}


def _err_no_outcome(err_no: int, message: str, began: float) -> Outcome:
    return Outcome(
        f"err_no {err_no}",
        ok=False,
        retryable=err_no in _RETRY_ERR_NO,
        seconds=time.monotonic() - began,
        message=message[:200],
    )


def _http_outcome(reply: httpx.Response, began: float, *, pipeline: bool) -> Outcome:
    if reply.status_code == 200 and pipeline:
        err_no = reply.json().get("err_no", 0)
        if err_no != 0:
            return _err_no_outcome(err_no, str(reply.json().get("err_msg", "")), began)
    if reply.status_code == 200:
        return _served(reply.headers, began)
    return Outcome(
        f"http {reply.status_code}",
        ok=False,
        retryable=reply.status_code in _RETRY_HTTP,
        seconds=time.monotonic() - began,
        message=reply.text[:200],
    )


def call_until_settled(
    client: SurfaceClient,
    surface: str,
    request_id: str,
    image: bytes,
    *,
    tenant: str | None = None,
    model: str = "ocr",
    give_up: threading.Event | None = None,
    max_attempts: int = 1000,
    pause_s: float = 0.05,
    max_pause_s: float = 1.0,
) -> list[Outcome]:
    """Attempt the call, retrying the SAME id and payload while the answer is retryable.

    Returns every attempt; the last is the settled one unless ``give_up`` was set or
    ``max_attempts`` ran out (then it is still retryable: the id's fate is unknown to the
    client). Waits ``pause_s``, doubling per failed attempt up to ``max_pause_s`` (many
    clients hammering a restarting server would slow its start), and at least 1 s after an
    answer that asked to back off (503 / RESOURCE_EXHAUSTED carry ``Retry-After: 1``).
    """
    attempts: list[Outcome] = []
    while len(attempts) < max_attempts:
        outcome = client.call(surface, request_id, image, tenant=tenant, model=model)
        attempts.append(outcome)
        if not outcome.retryable or (give_up is not None and give_up.is_set()):
            break
        pause = min(max_pause_s, pause_s * 2 ** (len(attempts) - 1)) * random.uniform(0.8, 1.2)
        if outcome.status in ("http 503", "grpc RESOURCE_EXHAUSTED", "err_no 3001"):
            pause = max(pause, 1.0)
        time.sleep(pause)
    return attempts


Key = tuple[str, str]  # (tenant, request_id)
BAD_KINDS = ("bad_image", "unknown_model", "id_conflict")


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One attempt of a `LoadClient`: when it started (monotonic), what it was, its answer."""

    started: float
    kind: str  # "good" or one of BAD_KINDS
    surface: str
    key: Key
    outcome: Outcome


class LoadClient(threading.Thread):
    """Client ``n``: calls with its own ids ``{prefix}{n}-{i}`` on its surfaces in turn, each
    retried until settled, until `stop` is set (the call in progress is finished first).

    ``image(n, i)`` is call i's payload. With ``bad_every`` k > 0 every k-th call is a bad
    one, cycling through `BAD_KINDS` (its own id, except ``id_conflict``, which reuses the
    client's last billed id with a new payload). ``told`` maps each good key to the
    (input, output) tokens the client was told; ``attempts`` keeps every attempt;
    ``unsettled`` lists good keys whose fate the client never learnt (`abandon` set or
    attempts exhausted). Set `abandon` to end a client whose server will not come back.
    """

    def __init__(
        self,
        n: int,
        endpoint: Endpoint,
        *,
        prefix: str,
        image: Callable[[int, int], bytes],
        stop: threading.Event,
        surfaces: tuple[str, ...] = SURFACES,
        tenant: str | None = None,
        bad_every: int = 0,
        timeout_s: float = 60.0,
        max_attempts: int = 1000,
    ) -> None:
        super().__init__(name=f"load-client-{n}", daemon=True)
        self.n, self.endpoint, self.prefix, self.image = n, endpoint, prefix, image
        self.stop_event, self.surfaces, self.tenant = stop, surfaces, tenant
        self.bad_every, self.timeout_s, self.max_attempts = bad_every, timeout_s, max_attempts
        self.abandon = threading.Event()
        self.told: dict[Key, tuple[int, int]] = {}
        self.attempts: list[Attempt] = []
        self.unsettled: list[Key] = []
        self.served_started: list[float] = []  # when each good call that was served began
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with SurfaceClient(self.endpoint, timeout_s=self.timeout_s) as client:
                self._run(client)
        except BaseException as exc:  # reported by the test, never swallowed
            self.error = exc

    def _run(self, client: SurfaceClient) -> None:
        tenant = self.tenant or "default"
        last_billed: tuple[str, bytes] | None = None
        i = 0
        while not self.stop_event.is_set():
            surface = self.surfaces[i % len(self.surfaces)]
            kind = "good"
            if self.bad_every and i % self.bad_every == self.bad_every - 1:
                # Clients start at different kinds, so short runs see every kind too.
                kind = BAD_KINDS[(i // self.bad_every + self.n) % len(BAD_KINDS)]
            request_id, image, model = f"{self.prefix}{self.n}-{i}", self.image(self.n, i), "ocr"
            if kind == "bad_image":
                image = b"not an image " + request_id.encode()
            elif kind == "unknown_model":
                model = "nosuchmodel"
            elif kind == "id_conflict":
                if last_billed is None:
                    kind = "good"
                else:
                    request_id = last_billed[0]  # the billed id, another payload (image i)
            started = time.monotonic()
            tries = call_until_settled(
                client, surface, request_id, image, tenant=self.tenant, model=model,
                give_up=self.abandon, max_attempts=self.max_attempts,
            )
            key = (tenant, request_id)
            self.attempts += [Attempt(started, kind, surface, key, t) for t in tries]
            if kind == "good":
                if tries[-1].ok:
                    self.told[key] = (tries[-1].input_tokens, tries[-1].output_tokens)
                    self.served_started.append(started)
                    last_billed = (request_id, image)
                elif tries[-1].retryable:
                    self.unsettled.append(key)
            i += 1

    def served_since(self, t: float) -> int:
        """Good calls begun after monotonic time ``t`` and served (in the end)."""
        return sum(1 for at in self.served_started if at > t)


def billed_ok_rows(url: str, request_id_prefix: str) -> dict[Key, list[tuple[int, int]]]:
    """The ledger's billed rows (``status = 'ok'``) whose request id starts with the prefix:
    ``(tenant, request_id) -> [(input_tokens, output_tokens), ...]`` (one item per row).

    ``url`` is a SQLite file path or a ``postgresql://`` URL.
    """
    query = (
        "SELECT tenant, request_id, input_tokens, output_tokens FROM usage_records "
        "WHERE status = 'ok' AND request_id LIKE {p}"
    )
    pattern = request_id_prefix.replace("_", r"\_").replace("%", r"\%") + "%"
    if url.startswith("postgresql://"):
        with psycopg.connect(url, connect_timeout=10) as conn:
            result = conn.execute(query.format(p="%s"), (pattern,)).fetchall()
    else:
        with contextlib.closing(sqlite3.connect(url, timeout=30)) as conn:
            result = conn.execute(query.format(p="? ESCAPE '\\'"), (pattern,)).fetchall()
    rows: dict[Key, list[tuple[int, int]]] = {}
    for tenant, request_id, input_tokens, output_tokens in result:
        rows.setdefault((tenant, request_id), []).append((int(input_tokens), int(output_tokens)))
    return rows


def ledger_discrepancies(
    told: Mapping[Key, tuple[int, int]], billed: Mapping[Key, list[tuple[int, int]]]
) -> dict[str, dict]:
    """What differs between what clients were told (``key -> (input, output) tokens``) and
    the billed rows: ``lost`` (told, not billed), ``doubled`` (billed more than once),
    ``unexpected`` (billed, never told) and ``wrong_tokens`` (billed other counts). All
    four empty means exact."""
    return {
        "lost": {k: v for k, v in told.items() if k not in billed},
        "doubled": {k: v for k, v in billed.items() if len(v) > 1},
        "unexpected": {k: v for k, v in billed.items() if k not in told},
        "wrong_tokens": {
            k: (told[k], v) for k, v in billed.items() if k in told and len(v) == 1 and v[0] != told[k]
        },
    }
