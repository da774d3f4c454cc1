"""PaddleX's ``POST /ocr`` and PDF input, end to end: the real server, real PP-OCRv4 models,
real clients on loopback, the real SQLite ledger.

- A client written exactly as PaddleOCR 3.x's serving docs show (``requests.post(url,
  json={"file": ..., "fileType": 1})``) reads the corpus text; answers (and requests) are
  validated with PaddleX 3.x's own schema classes in .venv-paddlex-schema
  (scripts/setup_paddlex_schema_venv.sh; skipped without it, except in CI).
- A two-page PDF rendered here (a court-judgement page of CJK text and an invoice page):
  every page's text read on all five surfaces (OIP gRPC, OIP REST, pipeline gRPC, pipeline
  HTTP, /ocr), with the page of each line, and its pages and characters billed exactly
  (ledger row, price, /metrics, report, JSONL export's one ``image`` per request).
- Bad input: corrupt, truncated, encrypted and oversized PDFs, too many pages, a fileType
  contradicting the bytes, a URL file, options we cannot honour: each a clear error, never
  billed, and the server still serving. A budget reserves its OCR estimate per page and
  refuses in PaddleX's error shape. A `file` URL is fetched only from a host in
  server.ocr_url_hosts (a loopback server of the test's own), never through a redirect, at
  most max_message_bytes. Paddle Serving 0.9's real PipelineClient (.venv-ps39) sends a
  PDF too.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import sqlite3
import subprocess
import threading
import uuid
from decimal import Decimal
from pathlib import Path

import grpc
import httpx
import numpy as np
import pypdf
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from imaging import CORPUS, DOCUMENT_LINES, JUDGEMENT_LINES, render_pdf, same_text
from PIL import Image
from support.server import ServerProcess
from tritonclient.utils import InferenceServerException

from billing.export import export_records
from billing.report import build_report
from exporters.ledger import LedgerReader
from serving.proto import pipeline_service_pb2 as pb
from serving.proto import pipeline_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PYTHON = ROOT / ".venv-paddlex-schema" / "bin" / "python"
MAX_PAGES = 4
MAX_PAGE_PIXELS = 3_000_000
PAGES = [JUDGEMENT_LINES, DOCUMENT_LINES]
ESTIMATE_PER_PAGE = 300
MAX_BYTES = 2_000_000
CAPPED_CHARACTERS = 1000  # over one page's estimate, under four pages' estimate
PRICES = {"per_1k_characters": Decimal("0.0200"), "per_page": Decimal("0.0030"),
          "per_image": Decimal("0.0010")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("paddlex-ocr")
    pricing = workdir / "pricing.yaml"
    pricing.write_text(
        "currency: CNY\nmodels:\n  ocr:\n    - price_id: ocr-pages\n"
        '      effective_from: "2026-01-01"\n'
        + "".join(f'      {k}: "{v}"\n' for k, v in PRICES.items()),
        encoding="utf-8",
    )
    config = {
        # A name, not an address: http://127.0.0.1/... is not on the list.
        "server": {"ocr_url_hosts": ["localhost"], "max_message_bytes": MAX_BYTES},
        "pricing": {"file": str(pricing)},
        "budgets": {"ocr_estimate_chars_per_image": ESTIMATE_PER_PAGE,
                    "limits": [{"tenant": "capped", "period": "month",
                                "limit_characters": CAPPED_CHARACTERS}]},
        "models": {"ocr": {"kind": "ocr", "options": {
            "max_pdf_pages": MAX_PAGES, "max_pdf_page_pixels": MAX_PAGE_PIXELS}}},
    }
    with ServerProcess(workdir, config) as proc:
        yield proc


@pytest.fixture(scope="module")
def pdf() -> bytes:
    return render_pdf(PAGES)


def _ledger(server) -> Path:
    return server.workdir / "data" / "ledger.sqlite3"


def _row(server, request_id: str) -> dict:
    with contextlib.closing(sqlite3.connect(_ledger(server))) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute(
            "SELECT * FROM usage_records WHERE request_id = ?", (request_id,))]
    assert len(rows) == 1, rows
    return rows[0]


def _rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- the five surfaces: (lines as (page, text)) -------------------------------------


def _oip_lines(result_json: str) -> list[tuple[int, str]]:
    document = json.loads(result_json)
    return [(line.get("page", 1), line["text"]) for line in document["lines"]]


def oip_grpc(server, data: bytes, rid: str) -> list[tuple[int, str]]:
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    result = client.infer("ocr", [tensor], headers={"x-request-id": rid})
    return _oip_lines(result.as_numpy("result")[0].decode("utf-8"))


def oip_http(server, data: bytes, rid: str) -> list[tuple[int, str]]:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    tensor = triton_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    result = client.infer("ocr", [tensor], headers={"x-request-id": rid})
    return _oip_lines(result.as_numpy("result")[0].decode("utf-8"))


def _pipeline_lines(keys: list[str], values: list[str]) -> list[tuple[int, str]]:
    fields = dict(zip(keys, values, strict=True))
    items = eval(fields["res"])  # noqa: S307 - what Paddle Serving's example client does
    pages = eval(fields["page"]) if "page" in fields else [1] * len(items)  # noqa: S307
    return [(page, item[0]) for page, item in zip(pages, items, strict=True)]


def pipeline_grpc(server, data: bytes, rid: str) -> list[tuple[int, str]]:
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = pb_grpc.PipelineServiceStub(channel).inference(
            pb.Request(key=["image"], value=[_b64(data)], name="ocr"),
            metadata=[("x-request-id", rid)],
        )
    assert reply.err_no == 0, reply.err_msg
    return _pipeline_lines(list(reply.key), list(reply.value))


def pipeline_http(server, data: bytes, rid: str) -> list[tuple[int, str]]:
    reply = httpx.post(f"{server.http_url}/ocr/prediction",
                       json={"key": ["image"], "value": [_b64(data)]},
                       headers={"x-request-id": rid}, timeout=120)
    body = reply.json()
    assert reply.status_code == 200 and body["err_no"] == 0, body
    return _pipeline_lines(body["key"], body["value"])


def paddlex_ocr(server, data: bytes, rid: str) -> list[tuple[int, str]]:
    reply = requests.post(f"{server.http_url}/ocr", json={"file": _b64(data)},
                          headers={"x-request-id": rid}, timeout=120)
    body = reply.json()
    assert reply.status_code == 200 and body["errorCode"] == 0, body
    assert body["logId"] == rid
    return [(page, text)
            for page, res in enumerate(body["result"]["ocrResults"], start=1)
            for text in res["prunedResult"]["rec_texts"]]


SURFACES = {"oip_grpc": oip_grpc, "oip_http": oip_http, "pipeline_grpc": pipeline_grpc,
            "pipeline_http": pipeline_http, "paddlex_ocr": paddlex_ocr}


def _expected_cost(characters: int, pages: int) -> Decimal:
    cost = (PRICES["per_1k_characters"] * characters / 1000 + PRICES["per_page"] * pages
            + PRICES["per_image"])
    return cost.quantize(Decimal("0.000001"))


@pytest.mark.parametrize("surface", SURFACES)
def test_pdf_every_page_read_and_billed_per_page(server, pdf, surface):
    rid = _rid(surface)
    lines = SURFACES[surface](server, pdf, rid)
    expected = [(n, text) for n, page in enumerate(PAGES, start=1) for text in page]
    assert len(lines) == len(expected), lines
    for (page, text), (want_page, want) in zip(lines, expected, strict=True):
        assert page == want_page and same_text(text, want), (page, text, want_page, want)
    row = _row(server, rid)
    characters = sum(len(text) for _, text in lines)
    assert (row["status"], row["pages"], row["images"], row["characters"]) == (
        "ok", 2, 1, characters)
    assert Decimal(row["cost"]) == _expected_cost(characters, 2)


def test_an_image_is_one_page(server):
    rid = _rid("image")
    item = CORPUS["cjk_invoice"]
    lines = paddlex_ocr(server, item.data, rid)
    assert [p for p, _ in lines] == [1] and same_text(lines[0][1], item.lines[0])
    row = _row(server, rid)
    assert (row["pages"], row["images"]) == (1, 1)
    assert Decimal(row["cost"]) == _expected_cost(row["characters"], 1)


def test_pages_in_metrics_report_and_export(server, pdf, tmp_path):
    paddlex_ocr(server, pdf, _rid("totals"))
    with contextlib.closing(sqlite3.connect(_ledger(server))) as conn:
        billed_pages, billed_requests = conn.execute(
            "SELECT SUM(pages), COUNT(*) FROM usage_records WHERE status = 'ok'").fetchone()
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=30).text
    samples = [line for line in metrics.splitlines()
               if line.startswith("paddle_meter_pages_total")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in samples) == billed_pages, samples
    reader = LedgerReader(str(_ledger(server)))
    report = build_report(reader, start="2026-01-01", end="2099-01-01", by="model")
    assert sum(r["pages"] for r in report) == billed_pages
    out = tmp_path / "usage.jsonl"
    export_records(reader, start="2026-01-01", end="2099-01-01", fmt="jsonl", path=str(out),
                   progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == billed_requests
    # the seed-compatible `image` is one per request, whatever its pages
    assert all(r["image"] is not None for r in ok)
    assert any(r["pages"] == 2 for r in ok)


# -- PaddleOCR 3.x's own client and PaddleX's own schema ------------------------------


def test_paddleocr_docs_client_unchanged(server, tmp_path):
    """The client of PaddleOCR 3.x's serving docs, pointed at us: only the URL changes."""
    item = CORPUS["document"]
    (tmp_path / "demo.png").write_bytes(item.data)
    API_URL = f"{server.http_url}/ocr"  # noqa: N806 - as the docs write it
    file_path = str(tmp_path / "demo.png")
    with open(file_path, "rb") as file:
        file_bytes = file.read()
        file_data = base64.b64encode(file_bytes).decode("ascii")
    payload = {"file": file_data, "fileType": 1}
    response = requests.post(API_URL, json=payload)
    assert response.status_code == 200
    result = response.json()["result"]
    texts = []
    for i, res in enumerate(result["ocrResults"]):
        texts += res["prunedResult"]["rec_texts"]
        ocr_img_path = tmp_path / f"ocr_{i}.jpg"
        with open(ocr_img_path, "wb") as f:
            f.write(base64.b64decode(res["ocrImage"]))
        assert Image.open(ocr_img_path).size == (result["dataInfo"]["width"],
                                                 result["dataInfo"]["height"])
    assert len(texts) == len(item.lines)
    assert all(same_text(got, want) for got, want in zip(texts, item.lines, strict=True))


@pytest.mark.skipif(not SCHEMA_PYTHON.exists() and not os.environ.get("CI"),
                    reason="run scripts/setup_paddlex_schema_venv.sh for PaddleX's schema")
def test_answers_validate_against_paddlex_schema(server, pdf):
    requests_ = [
        {"file": _b64(CORPUS["document"].data), "fileType": 1},
        {"file": _b64(pdf), "fileType": 0, "visualize": False,
         "useDocOrientationClassify": False, "useDocUnwarping": False,
         "textDetLimitType": "max", "textRecScoreThresh": 0.5, "logId": "pdf-schema-1"},
        {"file": _b64(pdf), "fileType": None, "visualize": True},
    ]
    successes = []
    for body in requests_:
        reply = httpx.post(f"{server.http_url}/ocr", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        successes.append(reply.json())
    assert successes[1]["logId"] == "pdf-schema-1"
    assert successes[1]["result"]["dataInfo"]["type"] == "pdf"
    assert successes[1]["result"]["dataInfo"]["numPages"] == 2
    assert successes[0]["result"]["dataInfo"]["type"] == "image"
    failures = [httpx.post(f"{server.http_url}/ocr", json={"file": "not base64!"},
                           timeout=60).json(),
                httpx.post(f"{server.http_url}/ocr", content=b"{", timeout=60).json()]
    out = subprocess.run(
        [str(SCHEMA_PYTHON), str(ROOT / "tests/tools/paddlex_schema_check.py")],
        input=json.dumps({"requests": requests_, "successes": successes,
                          "failures": failures}),
        capture_output=True, text=True, timeout=300,
    )
    verdict = json.loads(out.stdout.strip().splitlines()[-1])
    assert verdict == {"ok": len(requests_) + len(successes) + len(failures)}, (
        verdict, out.stderr[-2000:])


# -- bad input ------------------------------------------------------------------------


def _encrypted(pdf: bytes) -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _big_page() -> bytes:
    # 2400 x 1600 px at 144 dpi renders to 3.84 M pixels, over MAX_PAGE_PIXELS
    image = Image.new("RGB", (2400, 1600), "white")
    out = io.BytesIO()
    image.save(out, format="PDF", resolution=144.0)
    return out.getvalue()


BAD_PDFS = {
    "corrupt": (lambda pdf: b"%PDF-1.7\n" + bytes(range(256)) * 8, 400, "corrupt or truncated"),
    "truncated": (lambda pdf: pdf[: len(pdf) // 3], 400, "corrupt or truncated"),
    "encrypted": (_encrypted, 400, "encrypted"),
    "oversized": (lambda pdf: _big_page(), 413, "max_pdf_page_pixels=3000000"),
    "too_many_pages": (lambda pdf: render_pdf([["第一页"]] * (MAX_PAGES + 1)), 413,
                       f"over the limit of max_pdf_pages={MAX_PAGES}"),
}


def _assert_not_billed(server, rid: str) -> None:
    row = _row(server, rid)
    assert row["status"] != "ok" and row["cost"] in (None, "0.000000", "0"), row
    assert row["pages"] == 0 and row["characters"] == 0


@pytest.mark.parametrize("case", BAD_PDFS)
def test_bad_pdfs_are_clear_errors_on_every_surface(server, pdf, case):
    make, status, words = BAD_PDFS[case]
    data = make(pdf)
    # /ocr: PaddleX's error shape, errorCode = the HTTP status
    rid = _rid(f"bad-{case}")
    reply = httpx.post(f"{server.http_url}/ocr", json={"file": _b64(data), "fileType": 0},
                       headers={"x-request-id": rid}, timeout=60)
    body = reply.json()
    assert reply.status_code == status, body
    assert body == {"logId": rid, "errorCode": status, "errorMsg": body["errorMsg"]}
    assert words in body["errorMsg"] and "PDF" in body["errorMsg"]
    _assert_not_billed(server, rid)
    # OIP REST: its status and {"error"}
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    tensor = triton_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        client.infer("ocr", [tensor])
    assert words in info.value.message() and info.value.status() == str(status)
    # OIP gRPC: INVALID_ARGUMENT / RESOURCE_EXHAUSTED
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        client.infer("ocr", [tensor])
    assert words in info.value.message()
    assert info.value.status() == ("StatusCode.INVALID_ARGUMENT" if status == 400
                                   else "StatusCode.RESOURCE_EXHAUSTED")
    # the pipeline: err_no 5000 with the message, transport OK
    for transport in ("grpc", "http"):
        if transport == "grpc":
            with grpc.insecure_channel(server.grpc_address) as channel:
                reply_pb = pb_grpc.PipelineServiceStub(channel).inference(
                    pb.Request(key=["image"], value=[_b64(data)], name="ocr"))
            err_no, err_msg = reply_pb.err_no, reply_pb.err_msg
        else:
            answer = httpx.post(f"{server.http_url}/ocr/prediction",
                                json={"key": ["image"], "value": [_b64(data)]}, timeout=60)
            assert answer.status_code == 200
            err_no, err_msg = answer.json()["err_no"], answer.json()["err_msg"]
        assert err_no == 5000 and words in err_msg, (transport, err_no, err_msg)
    # still serving
    assert paddlex_ocr(server, CORPUS["cjk_invoice"].data, _rid("after"))


BAD_REQUESTS = {
    "pdf_said_image": (lambda pdf: {"file": _b64(pdf), "fileType": 1},
                       "'fileType' is 1 (image), but 'file' is a PDF"),
    "image_said_pdf": (lambda pdf: {"file": _b64(CORPUS["cjk_invoice"].data), "fileType": 0},
                       "'fileType' is 0 (PDF), but 'file' is not a PDF"),
    "bad_file_type": (lambda pdf: {"file": _b64(pdf), "fileType": 2},
                      "'fileType' must be 0 (PDF), 1 (image) or null"),
    "url_not_listed": (lambda pdf: {"file": "https://example.com/judgement.pdf", "fileType": 0},
                       "'file' is a URL on example.com, which is not in server.ocr_url_hosts"),
    "url_address_not_listed": (lambda pdf: {"file": "http://127.0.0.1:9/judgement.pdf"},
                               "'file' is a URL on 127.0.0.1, which is not in"),
    "url_not_http": (lambda pdf: {"file": "file:///etc/passwd"},
                     "'file' is a URL that is not http(s)://host/..."),
    "unwarping": (lambda pdf: {"file": _b64(pdf), "useDocUnwarping": True},
                  "'useDocUnwarping' is true, but document unwarping"),
    "orientation": (lambda pdf: {"file": _b64(pdf), "useDocOrientationClassify": True},
                    "document orientation classification (no such model is served)"),
    "det_thresh": (lambda pdf: {"file": _b64(pdf), "textDetThresh": 0.5},
                   "'textDetThresh' is 0.5, but this model runs every request with the "
                   "detection pixel threshold 0.3"),
    "limit_type": (lambda pdf: {"file": _b64(pdf), "textDetLimitType": "min"},
                   'send "max" or leave it out'),
    "no_file": (lambda pdf: {"fileType": 0}, "'file' is required"),
    "not_base64": (lambda pdf: {"file": "%%%"}, "'file' is not valid Base64"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_ocr_requests_are_clear_errors(server, pdf, case):
    make, words = BAD_REQUESTS[case]
    rid = _rid(f"req-{case}")
    reply = httpx.post(f"{server.http_url}/ocr", json=make(pdf),
                       headers={"x-request-id": rid}, timeout=60)
    body = reply.json()
    assert reply.status_code == 400, body
    assert body == {"logId": rid, "errorCode": 400, "errorMsg": body["errorMsg"]}
    assert words in body["errorMsg"], body["errorMsg"]
    _assert_not_billed(server, rid)
    assert paddlex_ocr(server, CORPUS["cjk_invoice"].data, _rid("after"))


def test_ocr_unreadable_body_and_idempotent_retry(server, pdf):
    reply = httpx.post(f"{server.http_url}/ocr", content=b"{not json", timeout=60)
    body = reply.json()
    assert reply.status_code == 400 and body["errorCode"] == 400 and body["logId"]
    # a retry with the same request id and payload is billed once; another payload is 409
    rid = _rid("retry")
    first = paddlex_ocr(server, pdf, rid)
    assert paddlex_ocr(server, pdf, rid) == first
    assert _row(server, rid)["pages"] == 2
    other = httpx.post(f"{server.http_url}/ocr", json={"file": _b64(CORPUS["document"].data)},
                       headers={"x-request-id": rid}, timeout=60)
    body = other.json()
    assert other.status_code == 409, body
    assert body["logId"] == rid and body["errorCode"] == 409 and body["errorMsg"]


def test_budget_estimate_scales_with_pages_and_refuses_in_paddlex_shape(server):
    """A budget reserves ``ocr_estimate_chars_per_image`` per PAGE: a 4-page PDF (1200
    estimated) is refused under a 1000-character budget before any model work, answered
    {logId, errorCode: 429, errorMsg} with Retry-After; one image (300) is served."""
    four_pages = render_pdf([[f"第{i}页"] for i in range(1, MAX_PAGES + 1)])
    rid = _rid("capped-pdf")
    reply = httpx.post(f"{server.http_url}/ocr", json={"file": _b64(four_pages)},
                       headers={"x-request-id": rid, "x-tenant": "capped"}, timeout=60)
    body = reply.json()
    assert reply.status_code == 429, body
    assert body == {"logId": rid, "errorCode": 429, "errorMsg": body["errorMsg"]}
    assert "capped" in body["errorMsg"] and int(reply.headers["retry-after"]) > 0
    with contextlib.closing(sqlite3.connect(_ledger(server))) as conn:
        assert conn.execute("SELECT COUNT(*) FROM usage_records WHERE request_id = ?",
                            (rid,)).fetchone() == (0,)  # refused calls are never rows
    served = httpx.post(f"{server.http_url}/ocr",
                        json={"file": _b64(CORPUS["cjk_invoice"].data), "visualize": False},
                        headers={"x-tenant": "capped"}, timeout=60)
    assert served.status_code == 200 and served.json()["errorCode"] == 0, served.text


PS39_PYTHON = ROOT / ".venv-ps39" / "bin" / "python"


@pytest.mark.skipif(not PS39_PYTHON.exists() and not os.environ.get("CI"),
                    reason="run scripts/setup_ps_client_venv.sh for the real Paddle Serving client")
def test_real_paddle_serving_client_sends_a_pdf(server, pdf, tmp_path):
    path = tmp_path / "judgement.pdf"
    path.write_bytes(pdf)
    logid = 20261204
    out = subprocess.run(
        [str(PS39_PYTHON), str(ROOT / "tests/tools/ps_pipeline_client.py"),
         "--addr", server.grpc_address, "--image", str(path), "--logid", str(logid)],
        capture_output=True, text=True, timeout=180, check=True,
    )
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    assert reply["err_no"] == 0, reply
    lines = _pipeline_lines(reply["key"], reply["value"])
    expected = [(n, text) for n, page in enumerate(PAGES, start=1) for text in page]
    assert [p for p, _ in lines] == [p for p, _ in expected]
    assert all(same_text(got, want) for (_, got), (_, want) in zip(lines, expected, strict=True))
    row = _row(server, str(logid))
    assert (row["pages"], row["characters"]) == (2, sum(len(t) for _, t in lines))


@pytest.fixture(scope="module")
def file_host(pdf):
    """A loopback HTTP server of the test's own: the PDF, a redirect, a 404, an oversize."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/judgement.pdf":
                self._send(200, pdf)
            elif self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/judgement.pdf")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/big.pdf":
                self._send(200, b"%PDF-1.7\n" + b"0" * MAX_BYTES)
            else:
                self._send(404, b"no such file")

        def _send(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_on_the_allow_list_is_fetched_and_billed(server, file_host):
    rid = _rid("url")
    reply = httpx.post(f"{server.http_url}/ocr",
                       json={"file": f"{file_host}/judgement.pdf", "fileType": 0,
                             "visualize": False},
                       headers={"x-request-id": rid}, timeout=120)
    body = reply.json()
    assert reply.status_code == 200, body
    texts = [t for res in body["result"]["ocrResults"] for t in res["prunedResult"]["rec_texts"]]
    assert len(texts) == sum(len(page) for page in PAGES)
    row = _row(server, rid)
    assert (row["status"], row["pages"], row["characters"]) == ("ok", 2, sum(map(len, texts)))


@pytest.mark.parametrize("path, status, words", [
    ("/moved", 400, "answered HTTP 302 (redirects are not followed)"),
    ("/missing.pdf", 400, "answered HTTP 404"),
    ("/big.pdf", 413, f"larger than the server's limit of {MAX_BYTES} bytes"),
])
def test_url_fetch_failures_are_clear_errors(server, file_host, path, status, words):
    rid = _rid("url-bad")
    reply = httpx.post(f"{server.http_url}/ocr", json={"file": f"{file_host}{path}"},
                       headers={"x-request-id": rid}, timeout=60)
    body = reply.json()
    assert reply.status_code == status, body
    assert body == {"logId": rid, "errorCode": status, "errorMsg": body["errorMsg"]}
    assert words in body["errorMsg"] and "localhost" in body["errorMsg"]
    assert path not in body["errorMsg"]  # the host is named, never the URL
    assert paddlex_ocr(server, CORPUS["cjk_invoice"].data, _rid("after"))
