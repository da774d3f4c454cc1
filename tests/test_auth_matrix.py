"""The authorization matrix on one real server with ``auth.mode: required``.

Every role (caller, gateway, auditor of one tenant, auditor of ``*``, admin) × every guarded
surface (OIP gRPC and REST infer, pipeline gRPC and HTTP, /v1/tokenize, /v1/usage, /v1/keys)
× every credential state (none, malformed, unknown id, wrong secret, revoked, expired, the
right key) is one real call whose answer is asserted on its own transport: UNAUTHENTICATED
/ 401 with ``WWW-Authenticate: Bearer`` / err_no 4001, PERMISSION_DENIED / 403 / err_no
4003, or served. Then the ledger: a row for each served model call only, billed to the
key's tenant (a caller's spoofed ``x-tenant`` ignored, a gateway's honoured), and no
auditor reading another tenant. Keys are made with the real ``paddle-meter keys`` CLI.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from imaging import render_line
from support.keyed_calls import (
    MODEL_SURFACES,
    SURFACES,
    Credential,
    call_surface,
    dumps,
    usage_tenants,
)
from support.keys import auth_env, create_expired_key, create_key, keys_cli
from support.server import ServerProcess

from auth.keys import KEY_PREFIX, SECRET_CHARS

IMAGE = render_line("INVOICE 2026-0042", size=28)
# role label -> (tenant, role) of its key
ROLES = {
    "caller": ("finance", "caller"),
    "gateway": ("edge", "gateway"),
    "auditor": ("finance", "auditor"),
    "auditor_all": ("*", "auditor"),
    "admin": ("ops", "admin"),
}
STATES = ("none", "malformed", "unknown", "wrong_secret", "revoked", "expired", "right")
# What the right key of each role may do; every other state is unauthenticated everywhere.
ALLOWED = {
    "caller": {*MODEL_SURFACES, "tokenize"},
    "gateway": {*MODEL_SURFACES, "tokenize"},
    "auditor": {"usage"},
    "auditor_all": {"usage"},
    "admin": set(SURFACES),
}
# The raw form each refusal takes on each transport.
UNAUTHENTICATED = {"oip_grpc": "grpc UNAUTHENTICATED", "pipeline_grpc": "err_no 4001",
                   "pipeline_http": "err_no 4001"}
FORBIDDEN = {"oip_grpc": "grpc PERMISSION_DENIED", "pipeline_grpc": "err_no 4003",
             "pipeline_http": "err_no 4003"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("auth-matrix")
    demo = workdir / "ernie-demo"
    subprocess.run(
        [str(Path(sys.executable).with_name("paddle-meter")), "models", "make-demo-ernie",
         str(demo)],
        check=True, capture_output=True, timeout=600,
    )
    config = {
        "models": {
            "ocr": {"kind": "ocr"},
            # The demo ERNIE is untrained (no weights are reachable here): only its
            # tokenizer's counts matter to this test.
            "ernie": {"kind": "ernie", "options": {"model_dir": str(demo),
                                                   "task": "text_classification",
                                                   "max_seq_len": 64}},
        },
        "ledger": {"url": str(workdir / "ledger.sqlite3")},
        # The throttle is tested on its own (test_auth_workers.py): here every cell must
        # show its own answer, not 429 after the twentieth refusal.
        "auth": {"mode": "required", "cache_ttl_s": 1, "max_failures": 100000},
    }
    env = auth_env()
    with ServerProcess(workdir, config, env=env) as server:
        keys = {}
        for label, (tenant, role) in ROLES.items():
            right = create_key(server, tenant, role, name=f"{label} right", env=env)
            revoked = create_key(server, tenant, role, name=f"{label} revoked", env=env)
            keys_cli(server, "revoke", revoked[0], env=env)
            expired = create_expired_key(server, tenant, role, env=env)
            keys[label] = {"right": right, "revoked": revoked, "expired": expired}
        keys["legal"] = {"right": create_key(server, "legal", "caller", env=env)}
        yield server, keys, workdir


def _credential(keys, label: str, state: str) -> Credential:
    key = keys[label]["right"][1]
    if state == "none":
        return Credential(None)
    if state == "malformed":
        return Credential("not-a-paddle-meter-key")
    if state == "unknown":
        return Credential(f"{KEY_PREFIX}zzzzzzzzzzzz_{key[-SECRET_CHARS:]}")
    if state == "wrong_secret":
        wrong = "A" * SECRET_CHARS if not key.endswith("A" * SECRET_CHARS) else "B" * SECRET_CHARS
        return Credential(key[:-SECRET_CHARS] + wrong)
    return Credential(keys[label][state][1])


def _request_id(label: str, state: str, surface: str) -> str:
    return f"mx-{label}-{state}-{surface}"


@pytest.fixture(scope="module")
def matrix(stack):
    """Every cell's answer, called once: {(label, state, surface): Answer}."""
    server, keys, _ = stack
    # Revocations are read from the key table within cache_ttl_s (1 s): let them land.
    time.sleep(2.5)
    answers = {}
    for label, state, surface in itertools.product(ROLES, STATES, SURFACES):
        answers[label, state, surface] = call_surface(
            server, surface, _credential(keys, label, state), image=IMAGE,
            request_id=_request_id(label, state, surface),
        )
    return answers


def _expected(label: str, state: str, surface: str) -> str:
    if state != "right":
        return "unauthenticated"
    return "ok" if surface in ALLOWED[label] else "permission_denied"


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("label", ROLES)
def test_every_cell_answers_as_the_role_allows(matrix, label, state):
    wrong = {}
    for surface in SURFACES:
        answer = matrix[label, state, surface]
        want = _expected(label, state, surface)
        raw_want = {"unauthenticated": UNAUTHENTICATED.get(surface, "http 401"),
                    "permission_denied": FORBIDDEN.get(surface, "http 403")}.get(want)
        if answer.kind != want or (raw_want and answer.raw != raw_want):
            wrong[surface] = f"want {want} ({raw_want}), got {dumps(answer)}"
    assert not wrong, wrong


def test_http_refusals_name_the_bearer_scheme_and_say_what_to_do(matrix):
    for (label, state, surface), answer in matrix.items():
        if answer.raw == "http 401":
            assert answer.headers.get("www-authenticate", "").startswith("Bearer"), surface
        if answer.kind in ("unauthenticated", "permission_denied"):
            assert len(answer.message) > 20, (label, state, surface, answer.message)
    assert "revoked" in matrix["caller", "revoked", "oip_http"].message
    assert "expired" in matrix["caller", "expired", "oip_grpc"].message
    assert "auditor or admin" in matrix["caller", "right", "usage"].message


def test_only_served_model_calls_are_billed_each_to_its_keys_tenant(matrix, stack):
    _, _, workdir = stack
    served = {
        _request_id(label, state, surface): ROLES[label][0]
        for (label, state, surface), answer in matrix.items()
        if answer.kind == "ok" and surface in MODEL_SURFACES
    }
    assert len(served) == 3 * len(MODEL_SURFACES)  # caller, gateway, admin
    with contextlib.closing(sqlite3.connect(workdir / "ledger.sqlite3")) as db:
        rows = db.execute(
            "SELECT request_id, tenant, api_key_id, status FROM usage_records"
            " WHERE request_id LIKE 'mx-%'").fetchall()
    billed = {rid: tenant for rid, tenant, _, status in rows if status == "ok"}
    assert billed == served
    assert all(key_id for _, _, key_id, _ in rows)


def test_a_callers_spoofed_tenant_is_ignored_and_a_gateways_is_honoured(stack):
    server, keys, workdir = stack
    caller_id, caller = keys["caller"]["right"]
    gateway_id, gateway = keys["gateway"]["right"]
    cases = {
        "spoof-caller": (caller, "legal", "finance", caller_id),
        "spoof-gateway": (gateway, "legal", "legal", gateway_id),
        "spoof-gateway-none": (gateway, None, "edge", gateway_id),
    }
    for surface in ("oip_http", "pipeline_grpc"):
        for rid, (key, asserted, _, _) in cases.items():
            answer = call_surface(server, surface, Credential(key, "x-api-key"), image=IMAGE,
                                  request_id=f"{rid}-{surface}", tenant_header=asserted)
            assert answer.kind == "ok", dumps(answer)
    with contextlib.closing(sqlite3.connect(workdir / "ledger.sqlite3")) as db:
        rows = {rid: (tenant, key_id) for rid, tenant, key_id in db.execute(
            "SELECT request_id, tenant, api_key_id FROM usage_records"
            " WHERE request_id LIKE 'spoof-%'")}
    for surface in ("oip_http", "pipeline_grpc"):
        for rid, (_, _, billed_to, key_id) in cases.items():
            assert rows[f"{rid}-{surface}"] == (billed_to, key_id), (rid, surface)


def test_the_pipeline_feed_key_admits_and_never_reaches_the_model_or_ledger(stack):
    server, keys, workdir = stack
    _, key = keys["legal"]["right"]
    for surface in ("pipeline_grpc", "pipeline_http"):
        answer = call_surface(server, surface, Credential(key, "feed"), image=IMAGE,
                              request_id=f"feed-{surface}")
        assert answer.kind == "ok", dumps(answer)
        assert "api_key" not in answer.body and key not in str(answer.body)
        bad = call_surface(server, surface, Credential(key[:-3] + "zzz", "feed"), image=IMAGE,
                           request_id=f"feed-bad-{surface}")
        assert bad.raw == "err_no 4001", dumps(bad)
    with contextlib.closing(sqlite3.connect(workdir / "ledger.sqlite3")) as db:
        tenants = dict(db.execute("SELECT request_id, tenant FROM usage_records"
                                  " WHERE request_id LIKE 'feed-%'").fetchall())
    assert tenants == {"feed-pipeline_grpc": "legal", "feed-pipeline_http": "legal"}


def test_no_auditor_reads_another_tenant(matrix, stack):
    server, keys, _ = stack
    # Legal has usage of its own (the feed-key test may not have run first).
    call_surface(server, "oip_http", Credential(keys["legal"]["right"][1]), image=IMAGE,
                 request_id="mx-legal-usage")
    auditor = Credential(keys["auditor"]["right"][1])
    own = call_surface(server, "usage", auditor)
    assert own.kind == "ok" and usage_tenants(own) == {"finance"}, dumps(own)
    other = call_surface(server, "usage", auditor, usage_tenant="legal")
    assert other.raw == "http 403" and "finance only" in other.message, dumps(other)
    assert "legal" not in str(other.body)
    for label in ("auditor_all", "admin"):
        every = call_surface(server, "usage", Credential(keys[label]["right"][1]))
        assert {"finance", "legal", "edge", "ops"} <= usage_tenants(every), dumps(every)
        legal = call_surface(server, "usage", Credential(keys[label]["right"][1]),
                             usage_tenant="legal")
        assert usage_tenants(legal) == {"legal"}, dumps(legal)


def test_key_management_over_http_is_admin_only(stack):
    server, keys, _ = stack
    admin = {"authorization": f"Bearer {keys['admin']['right'][1]}"}
    caller = {"authorization": f"Bearer {keys['caller']['right'][1]}"}
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        made = http.post("/v1/keys", json={"tenant": "hr", "role": "caller", "name": "api"},
                         headers=admin)
        assert made.status_code == 201, made.text
        document = made.json()
        assert document["key"].startswith(KEY_PREFIX) and document["tenant"] == "hr"
        listed = http.get("/v1/keys", headers=admin).json()
        entries = listed["keys"] if isinstance(listed, dict) else listed
        assert document["id"] in {entry["id"] for entry in entries}
        assert document["key"] not in made.request.content.decode() + str(listed)
        refused = http.post(f"/v1/keys/{document['id']}/revoke", headers=caller)
        assert refused.status_code == 403
        assert http.post("/v1/keys/nosuchkey000/revoke", headers=admin).status_code == 404
        assert http.post(f"/v1/keys/{document['id']}/revoke", headers=admin).status_code == 200


def test_open_endpoints_stay_open(stack):
    server, _, _ = stack
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/ocr/ready", "/metrics"):
        assert httpx.get(f"{server.http_url}{path}", timeout=10).status_code == 200, path
    assert httpx.get(f"{server.http_url}/v2/models/ocr", timeout=10).status_code == 401
