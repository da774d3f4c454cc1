"""Keys across ``--workers 2``: revocation, creation and rotation reach both workers within
the stated bound; the failed-attempt throttle; ``auth.metrics_require_key``.

Each worker keeps its own key cache, re-read from the key table every ``auth.cache_ttl_s``
(2 s here): the stated bound for a change made anywhere (CLI or HTTP, on either worker) is
that plus one table read, and the tests allow ``cache_ttl_s + 5`` s. A worker is addressed
on purpose: a keep-alive HTTP connection stays with the worker that accepted it, found
from /proc (the socket's inode in that worker's fds), so "both workers" is checked, not
hoped for. The throttle is per worker process (documented in docs/design.md): each
connection sees at most ``max_failures`` refusals before 429.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
from pathlib import Path

import grpc
import pytest
from imaging import render_line
from support.keys import auth_env, create_key, keys_cli
from support.server import ServerProcess
from test_serving_workers import _ESTABLISHED, _fd_inodes, _listening_pids, _wait_until
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from serving.proto import pipeline_service_pb2 as pipeline_pb
from serving.proto import pipeline_service_pb2_grpc as pipeline_grpc

CACHE_TTL_S = 2.0
BOUND_S = CACHE_TTL_S + 5
MAX_FAILURES = 6
FAILURE_WINDOW_S = 4.0
IMAGE = render_line("PO 7731", size=28)


def _server_socket_inode(server_port: int, client_port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(f.split(":")[1], 16) for f in fields[1:3])
            if fields[3] == _ESTABLISHED and local == server_port and remote == client_port:
                return fields[9]
    return None


class WorkerConnection:
    """A keep-alive HTTP/1.1 connection and the pid of the worker that accepted it."""

    def __init__(self, port: int, workers: set[int]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.connect()
        client_port = self.conn.sock.getsockname()[1]
        deadline = time.monotonic() + 10
        self.pid = None
        while self.pid is None and time.monotonic() < deadline:
            inode = _server_socket_inode(port, client_port)
            self.pid = next((pid for pid in workers if inode and inode in _fd_inodes(pid)), None)
            time.sleep(0.02)
        assert self.pid is not None, "no worker accepted the connection"

    def request(self, method: str, path: str, key: str | None = None,
                body: dict | None = None) -> tuple[int, dict[str, str], str]:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        self.conn.request(method, path, body=json.dumps(body) if body is not None else None,
                          headers=headers)
        reply = self.conn.getresponse()
        text = reply.read().decode()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, text

    def status(self, key: str) -> int:
        """The status of a cheap keyed call (model metadata) on this worker."""
        return self.request("GET", "/v2/models/ocr", key)[0]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("auth-workers")
    config = {
        "models": {"ocr": {"kind": "ocr"}},
        "ledger": {"url": str(workdir / "ledger.sqlite3")},
        "auth": {"mode": "required", "cache_ttl_s": CACHE_TTL_S, "max_failures": MAX_FAILURES,
                 "failure_window_s": FAILURE_WINDOW_S, "metrics_require_key": True},
    }
    env = auth_env()
    server = ServerProcess(workdir, config, env=env, workers=2).start()
    try:
        _wait_until(lambda: len(_listening_pids(server.http_port)) == 2,
                    "both workers to listen", 180)
        admin = create_key(server, "ops", "admin", env=env)
        yield server, env, admin
    finally:
        server.stop()


def connections_to_each_worker(server, workers: int = 2) -> dict[int, WorkerConnection]:
    """One keep-alive connection to each of the ``workers`` worker processes of ``server``:
    {pid: WorkerConnection} (connections are opened until every worker accepted one)."""
    pids = _listening_pids(server.http_port)
    found: dict[int, WorkerConnection] = {}
    for _ in range(200):
        conn = WorkerConnection(server.http_port, pids)
        if conn.pid in found:
            conn.close()
        else:
            found[conn.pid] = conn
        if len(found) == workers:
            return found
    for conn in found.values():
        conn.close()
    raise AssertionError("could not reach every worker")


@pytest.fixture(scope="module")
def workers(stack):
    """One connection to each worker: {pid: WorkerConnection}."""
    found = connections_to_each_worker(stack[0])
    yield found
    for conn in found.values():
        conn.close()


def _wait_for_status(workers, key: str, want: int) -> dict[int, float]:
    """Seconds until each worker answers ``want`` for ``key``; fails past BOUND_S."""
    began, seen = time.monotonic(), {}
    while len(seen) < len(workers):
        for pid, conn in workers.items():
            if pid not in seen and conn.status(key) == want:
                seen[pid] = time.monotonic() - began
        elapsed = time.monotonic() - began
        assert elapsed < BOUND_S, f"after {elapsed:.1f}s only workers {sorted(seen)} say {want}"
        time.sleep(0.1)
    return seen


def test_a_key_revoked_with_the_cli_is_refused_by_both_workers_in_time(stack, workers):
    server, env, _ = stack
    key_id, key = create_key(server, "finance", "caller", env=env)
    assert _wait_for_status(workers, key, 200)  # cached as valid in both workers
    keys_cli(server, "revoke", key_id, env=env)
    took = _wait_for_status(workers, key, 401)
    print(f"CLI revocation refused by both workers after {max(took.values()):.2f}s")
    for conn in workers.values():
        status, headers, text = conn.request("GET", "/v2/models/ocr", key)
        assert (status, "revoked" in text) == (401, True)
        assert headers["www-authenticate"].startswith("Bearer")


def test_keys_created_and_revoked_over_http_reach_the_other_worker(stack, workers):
    _, _, (_, admin) = stack
    first, second = workers.values()
    status, _, text = first.request("POST", "/v1/keys", admin,
                                    {"tenant": "legal", "role": "caller", "name": "via http"})
    assert status == 201, text
    made = json.loads(text)
    assert _wait_for_status(workers, made["key"], 200)
    status, _, text = second.request("POST", f"/v1/keys/{made['id']}/revoke", admin)
    assert status == 200, text
    took = _wait_for_status(workers, made["key"], 401)
    print(f"HTTP revocation refused by both workers after {max(took.values()):.2f}s")


def test_rotation_keeps_the_old_secret_for_its_grace_then_refuses_it(stack, workers):
    server, env, _ = stack
    key_id, old = create_key(server, "finance", "caller", env=env)
    assert _wait_for_status(workers, old, 200)
    # Longer than the bound in which both workers learn the new key, so the old one is
    # checked while its grace still runs, however slowly the machine answers.
    grace_s = BOUND_S + 5
    rotated_at = time.monotonic()
    rotated = json.loads(keys_cli(server, "rotate", key_id, "--grace", str(grace_s), "--json",
                                  env=env).stdout)
    new = rotated["key"]
    assert rotated["id"] == key_id and new != old
    assert _wait_for_status(workers, new, 200)
    assert time.monotonic() - rotated_at < grace_s
    assert all(conn.status(old) == 200 for conn in workers.values())  # within its grace
    while time.monotonic() - rotated_at < grace_s:  # calls keep the connections alive
        assert all(conn.status(new) == 200 for conn in workers.values())
        time.sleep(1)
    _wait_for_status(workers, old, 401)
    assert all(conn.status(new) == 200 for conn in workers.values())


def test_metrics_can_require_an_auditor_or_admin_key(stack, workers):
    server, env, (_, admin) = stack
    _, caller = create_key(server, "finance", "caller", env=env)
    _, auditor = create_key(server, "*", "auditor", env=env)
    conn = next(iter(workers.values()))
    assert conn.request("GET", "/metrics")[0] == 401
    assert conn.request("GET", "/metrics", caller)[0] == 403
    for key in (auditor, admin):
        status, _, text = conn.request("GET", "/metrics", key)
        assert status == 200 and "paddle_meter" in text
    assert conn.request("GET", "/v2/health/ready")[0] == 200  # probes stay open


def test_repeated_failures_from_one_peer_are_refused_429_on_every_surface(stack, workers):
    """Last in the module: the throttle refuses this peer (loopback) for a while."""
    server, env, _ = stack
    _, key = create_key(server, "finance", "caller", env=env)
    bad = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    conn = next(iter(workers.values()))
    statuses = [conn.request("GET", "/v2/models/ocr", bad) for _ in range(MAX_FAILURES + 1)]
    assert [s for s, _, _ in statuses].count(429) >= 1, [s for s, _, _ in statuses]
    status, headers, text = conn.request("GET", "/v2/models/ocr", key)  # even a right key
    assert status == 429 and 0 < int(headers["retry-after"]) <= FAILURE_WINDOW_S + 1, text
    assert "too many failed authentications" in text

    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pipeline_grpc.PipelineServiceStub(channel)
        request = pipeline_pb.Request(key=["image", "api_key"],
                                      value=[base64.b64encode(IMAGE).decode(), bad], name="ocr")
        err_nos = [stub.inference(request, timeout=30).err_no for _ in range(MAX_FAILURES + 1)]
    assert err_nos[-1] == 4029 and set(err_nos) <= {4001, 4029}, err_nos
    with grpc.insecure_channel(server.grpc_address) as channel:  # one worker's connection
        metadata = [("authorization", f"Bearer {bad}")]
        codes = []
        for _ in range(MAX_FAILURES + 1):
            try:
                oip_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                    oip_pb.ModelMetadataRequest(name="ocr"), metadata=metadata, timeout=30)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                trailers = dict(exc.trailing_metadata() or ())
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes
    assert 0 < float(trailers["retry-after"]) <= FAILURE_WINDOW_S + 1
    # A slowdown, not a ban: once the window has room the right key is served again.
    # (A new connection: the kept-alive one idled past the server's keep-alive timeout.)
    time.sleep(FAILURE_WINDOW_S + 1)
    again = WorkerConnection(server.http_port, set(workers))
    try:
        assert again.status(key) == 200
    finally:
        again.close()
