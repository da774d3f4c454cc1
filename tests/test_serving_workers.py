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


def _listening_pids(port: int) -> set[int]:
    """PIDs holding a LISTEN socket on 127.0.0.1:port, read from /proc (no extra tools)."""
    inodes = set()
    table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    table += Path("/proc/net/tcp6").read_text().splitlines()[1:]
    for line in table:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            inodes.add(inode)
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                match = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
                if match and match.group(1) in inodes:
                    pids.add(int(pid))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("workers"), workers=2).start()
    # The first worker to load answers readiness; wait until the second listens too.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if len(_listening_pids(server.http_port)) == 2 and len(_listening_pids(server.grpc_port)) == 2:
            break
        time.sleep(0.5)
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
        time.sleep(0.5)  # requests are on the wire and being served
        two_workers.proc.send_signal(15)
        results = [f.result(timeout=120) for f in futures]
    for lines in results:
        assert len(lines) == len(item.lines)
        assert all(same_text(g, e) for g, e in zip(lines, item.lines, strict=True))
    assert two_workers.proc.wait(60) == 0, two_workers.logs()[-3000:]
