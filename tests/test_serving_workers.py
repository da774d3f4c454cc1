"""``--workers 2``: both processes bind both ports and serve; SIGTERM loses no request."""

from __future__ import annotations

import concurrent.futures
import os
import re
import time
from pathlib import Path

import pytest
from imaging import CORPUS, same_text
from support.server import ServerProcess
from test_serving_ocr import ocr_oip_grpc, ocr_oip_http, ocr_pipeline_grpc, ocr_pipeline_http

_LISTEN, _ESTABLISHED = "0A", "01"


def _socket_inodes(port: int, state: str) -> set[str]:
    """Inodes of TCP sockets whose local port is ``port`` in ``state``, from /proc."""
    table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    table += Path("/proc/net/tcp6").read_text().splitlines()[1:]
    inodes = set()
    for line in table:
        fields = line.split()
        if fields[3] == state and int(fields[1].split(":")[1], 16) == port:
            inodes.add(fields[9])
    return inodes


def _fd_inodes(pid: int | str) -> set[str]:
    found = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            match = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
            if match:
                found.add(match.group(1))
    except OSError:
        pass
    return found


def _unread_bytes(ports: tuple[int, ...]) -> int:
    """Bytes still queued on loopback connections to ``ports``: unsent by the client
    (tx_queue of its socket) or unread by the server (rx_queue of the accepted socket)."""
    table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    table += Path("/proc/net/tcp6").read_text().splitlines()[1:]
    queued = 0
    for line in table:
        fields = line.split()
        if fields[3] != _ESTABLISHED:
            continue
        local, remote = (int(f.split(":")[1], 16) for f in fields[1:3])
        tx, rx = (int(q, 16) for q in fields[4].split(":"))
        if remote in ports:  # the client's end
            queued += tx
        elif local in ports:  # the server's end
            queued += rx
    return queued


def _wait_until(condition, what: str, timeout_s: float) -> None:
    """Poll ``condition`` until it holds; fail the test if it does not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.05)


def _listening_pids(port: int) -> set[int]:
    """PIDs holding a LISTEN socket on 127.0.0.1:port, read from /proc (no extra tools)."""
    inodes = _socket_inodes(port, _LISTEN)
    return {int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if _fd_inodes(pid) & inodes}


def _accepted_connections(pids: set[int], ports: tuple[int, ...]) -> int:
    """Connections the worker processes have accepted on ``ports`` (not just queued)."""
    established = set().union(*(_socket_inodes(port, _ESTABLISHED) for port in ports))
    return sum(len(_fd_inodes(pid) & established) for pid in pids)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("workers"), workers=2).start()
    # The first worker to load answers readiness; wait until the second listens too.
    try:
        _wait_until(
            lambda: len(_listening_pids(server.http_port)) == 2
            and len(_listening_pids(server.grpc_port)) == 2,
            "both workers to listen on both ports",
            180,
        )
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


def test_both_workers_listen_on_both_ports(two_workers):
    http_pids = _listening_pids(two_workers.http_port)
    grpc_pids = _listening_pids(two_workers.grpc_port)
    assert len(http_pids) == 2 and http_pids == grpc_pids
    assert two_workers.proc.pid not in http_pids  # the parent only supervises


def test_sigterm_with_requests_in_flight_loses_none(two_workers):
    item = CORPUS["document"]
    calls = [ocr_oip_grpc, ocr_oip_http, ocr_pipeline_grpc, ocr_pipeline_http] * 3
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call, two_workers, item.data) for call in calls]
        # In flight means accepted by a worker: a connection still queued in a closing
        # listener's backlog is reset by the kernel, which no server can prevent.
        workers = _listening_pids(two_workers.http_port)
        ports = (two_workers.http_port, two_workers.grpc_port)
        # One connection per HTTP call; gRPC channels to one target share a connection.
        expected = sum(call in (ocr_oip_http, ocr_pipeline_http) for call in calls) + 1
        _wait_until(
            lambda: _accepted_connections(workers, ports) >= expected,
            f"{expected} connections accepted by the workers",
            60,
        )
        # ... and every request byte sent and read by a worker, so each call is in a
        # worker's hands when SIGTERM arrives.
        _wait_until(lambda: _unread_bytes(ports) == 0, "the workers to read every request", 60)
        two_workers.proc.send_signal(15)
        results = [f.result(timeout=120) for f in futures]
    for lines in results:
        assert len(lines) == len(item.lines)
        assert all(same_text(g, e) for g, e in zip(lines, item.lines, strict=True))
    assert two_workers.proc.wait(60) == 0, two_workers.logs()[-3000:]
