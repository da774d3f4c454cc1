"""PaddleX 3.x basic serving's OCR protocol: ``POST /ocr``, as PaddleOCR 3.x clients use it.

Wire-compatible with ``paddlex --serve --pipeline OCR`` (its schema:
paddlex/inference/serving/schemas/ocr.py and schemas/shared/ocr.py). The request is a JSON
object: ``file`` (Base64 of an image or a PDF), ``fileType`` (0 PDF, 1 image, null: told
from the bytes) and the pipeline's options. The answer is
``{logId, errorCode: 0, errorMsg: "Success", result: {ocrResults, dataInfo}}``, one
``ocrResults`` entry per page (an image is one page); a failure is
``{logId, errorCode, errorMsg}`` with ``errorCode`` = the HTTP status. Unknown fields are
ignored, as PaddleX's pydantic models ignore them.

- **Model.** ``/ocr`` serves the first configured model of kind ``ocr``.
- **logId** is the call's request id, the one it is metered and billed under: the caller's
  ``x-request-id`` wins, then the body's ``logId`` (when it is a valid request id), else a
  fresh one. It is in every answer, errors included.
- **Options.** Models we do not serve (``useDocOrientationClassify``, ``useDocUnwarping``)
  and word boxes (``returnWordBox``) are refused when true. The detection and recognition
  options (``useTextlineOrientation``, ``textDetLimitSideLen``, ``textDetLimitType``,
  ``textDetThresh``, ``textDetBoxThresh``, ``textDetUnclipRatio``, ``textRecScoreThresh``)
  are settings of the served model, the same for every request (so a line reads, and is
  billed, the same on every surface): a value equal to the model's is accepted, any other
  refused with the value it runs with. ``visualize`` true or null (PaddleX's server-side
  default is on, and the client of PaddleOCR's serving docs saves ``ocrImage``) draws the
  kept boxes over each page (``ocrImage``) and returns the page (``inputImage``) as Base64
  JPEG (at most 2000 px a side, as PaddleX does); false returns no images (null fields).
  ``docPreprocessingImage`` is always null (no preprocessing model is served).
- **No URL fetching by default.** PaddleX downloads ``file`` when it is a URL; here that is
  refused (it would be a server-side request forgery hole and a way for documents to leave
  the building) unless the URL's host is listed in ``server.ocr_url_hosts`` (exact names).
  Then it is fetched over http(s) without a proxy, redirects are not followed (a redirect
  is refused), at most ``server.max_message_bytes`` are read (more: 413), and a fetch that
  fails is 400 naming the host and the HTTP status; the URL itself is never logged.
- **Metering.** The route goes through the same ASGI metering middleware as every HTTP
  surface. Its auth decision is made in this frontend (auth/roles.py), so a refusal of
  the key, a budget or a rate limit, and a refusal metering makes after the call
  (``usage.error_renderer``: an idempotency conflict, a record that is not durable) are
  all answered in this protocol's error shape. A key is read from the headers only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import math
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from interceptors.request_id import REQUEST_ID_PATTERN
from models.ocr.imaging import decode_image
from models.ocr.pdf import is_pdf, render_pdf_page
from models.usage import current_usage
from serving.codecs.base import Codec
from serving.dispatch import run_model
from serving.errors import ServingError, as_serving_error, http_headers, http_status, log_internal
from serving.json_body import parse_json
from serving.model_host import ModelHost, ServedModel

__all__ = ["OCR_ENDPOINT", "OcrHttpReply", "answer_ocr"]

OCR_ENDPOINT = "/ocr"
FILE_TYPE_PDF, FILE_TYPE_IMAGE = 0, 1
_MAX_OUTPUT_SIDE = 2000
_URL_PREFIXES = ("http://", "https://", "ftp://", "file://", "s3://")
# Options naming models or outputs paddle-meter does not offer: refused when true.
_UNOFFERED = {
    "useDocOrientationClassify": "document orientation classification (no such model is served)",
    "useDocUnwarping": "document unwarping (no such model is served)",
    "returnWordBox": "word boxes (returnWordBox)",
}
# Option -> (settings key, type check, what it is): accepted only at the model's value.
_SETTINGS = {
    "useTextlineOrientation": ("use_textline_orientation", "bool", "text-line orientation"),
    "textDetLimitSideLen": ("det_limit_side_len", "int", "detection side limit"),
    "textDetLimitType": ("det_limit_type", "str", "detection limit type"),
    "textDetThresh": ("det_thresh", "float", "detection pixel threshold"),
    "textDetBoxThresh": ("det_box_thresh", "float", "detection box threshold"),
    "textDetUnclipRatio": ("det_unclip_ratio", "float", "detection unclip ratio"),
    "textRecScoreThresh": ("rec_score_thresh", "float", "recognition score threshold"),
}


@dataclasses.dataclass
class OcrHttpReply:
    """What the HTTP transport sends: status, JSON body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def encoded(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False).encode("utf-8")


def _error_body(log_id: str, status: int, message: str) -> dict[str, Any]:
    return {"logId": log_id, "errorCode": status, "errorMsg": message}


def _invalid(message: str) -> ServingError:
    return ServingError("invalid_argument", message)


@dataclasses.dataclass(frozen=True)
class _Request:
    data: bytes
    is_pdf: bool
    visualize: bool


def _check_type(name: str, value: Any, kind: str) -> None:
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
    }[kind]
    if not ok or (kind == "float" and not math.isfinite(value)):
        word = {"bool": "true, false", "int": "an integer", "str": "a string", "float": "a number"}
        raise _invalid(f"'{name}' must be {word[kind]} or null, got {json.dumps(value)}")


def _same(want: Any, got: Any, kind: str) -> bool:
    if kind == "float":
        return abs(float(want) - float(got)) <= 1e-9
    return want == got


def _parse_request(
    document: Mapping[str, Any], settings: Mapping[str, Any], fetched: bytes | None = None
) -> _Request:
    """Check the request against the schema and the model's settings; the file's bytes
    (``fetched``: what a ``file`` URL on the allow-list gave)."""
    for name, what in _UNOFFERED.items():
        value = document.get(name)
        if value is not None:
            _check_type(name, value, "bool")
        if value:
            raise _invalid(
                f"'{name}' is true, but {what} is not offered by paddle-meter; "
                "send false or leave it out"
            )
    for name, (key, kind, what) in _SETTINGS.items():
        value = document.get(name)
        if value is None:
            continue
        _check_type(name, value, kind)
        if not _same(settings[key], value, kind):
            want = json.dumps(settings[key])
            raise _invalid(
                f"'{name}' is {json.dumps(value)}, but this model runs every request with the "
                f"{what} {want} (a setting of the served model, not of a request); "
                f"send {want} or leave it out"
            )
    visualize = document.get("visualize")
    if visualize is not None:
        _check_type("visualize", visualize, "bool")
    log_id = document.get("logId")
    if log_id is not None:
        _check_type("logId", log_id, "str")
    file_type = document.get("fileType")
    if file_type is not None and (
        isinstance(file_type, bool) or file_type not in (FILE_TYPE_PDF, FILE_TYPE_IMAGE)
    ):
        raise _invalid(
            f"'fileType' must be 0 (PDF), 1 (image) or null (tell from the file), "
            f"got {json.dumps(file_type)}"
        )
    data = fetched if fetched is not None else _file_bytes(document.get("file"))
    pdf = is_pdf(data)
    if file_type == FILE_TYPE_PDF and not pdf:
        raise _invalid(
            "'fileType' is 0 (PDF), but 'file' is not a PDF (it does not start with %PDF-); "
            "send fileType 1 for an image, or null to tell from the file"
        )
    if file_type == FILE_TYPE_IMAGE and pdf:
        raise _invalid(
            "'fileType' is 1 (image), but 'file' is a PDF; send fileType 0 for a PDF, "
            "or null to tell from the file"
        )
    return _Request(data, pdf, visualize is not False)


def _url_of(value: Any) -> str | None:
    """The URL a ``file`` holds, or None when it is not one."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    return text if text.lower().startswith(_URL_PREFIXES) or "://" in text[:16] else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx surfaces as an HTTPError: a redirect is never followed


def _download(url: str, host: str, max_bytes: int) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
    try:
        with opener.open(url, timeout=10) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        moved = " (redirects are not followed)" if 300 <= exc.code < 400 else ""
        raise _invalid(
            f"fetching 'file' from {host} answered HTTP {exc.code}{moved}; "
            "send the file itself, Base64-encoded, in 'file'"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise _invalid(
            f"'file' could not be fetched from {host} ({reason}); "
            "send the file itself, Base64-encoded, in 'file'"
        ) from None
    if len(data) > max_bytes:
        raise ServingError(
            "resource_exhausted",
            f"the file at {host} is larger than the server's limit of {max_bytes} bytes "
            "(server.max_message_bytes)",
        )
    if not data:
        raise _invalid(f"the file fetched from {host} is empty")
    return data


def _allowed_host(url: str, hosts: frozenset[str]) -> str:
    """The host of ``url`` when this server may fetch from it; else raises the refusal."""
    if not hosts:
        raise _invalid(
            "'file' is a URL, and paddle-meter does not fetch URLs (fetching would let a "
            "caller make the server reach other hosts, and documents leave the building); "
            "send the file itself, Base64-encoded, in 'file' (an operator can allow hosts "
            "in server.ocr_url_hosts)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        parts, host = None, ""
    if parts is None or parts.scheme.lower() not in ("http", "https") or not host:
        raise _invalid("'file' is a URL that is not http(s)://host/...; only those are fetched")
    if host not in hosts:
        raise _invalid(
            f"'file' is a URL on {host}, which is not in server.ocr_url_hosts (the hosts "
            f"this server may fetch from: {', '.join(sorted(hosts))}); send the file itself, "
            "Base64-encoded, in 'file'"
        )
    return host


def _file_bytes(value: Any) -> bytes:
    if not isinstance(value, str):
        raise _invalid(
            "'file' is required: a string holding the Base64 of the image or PDF file"
            if value is None
            else f"'file' must be a string (Base64 of the file), got {type(value).__name__}"
        )
    text = value.strip()
    if text.lower().startswith(_URL_PREFIXES) or "://" in text[:16]:
        raise _invalid(
            "'file' is a URL, and paddle-meter does not fetch URLs (fetching would let a "
            "caller make the server reach other hosts, and documents leave the building); "
            "send the file itself, Base64-encoded, in 'file'"
        )
    if not text:
        raise _invalid("'file' is empty: send the Base64 of the image or PDF file")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid(
            f"'file' is not valid Base64 ({exc}); send the Base64 of the image or PDF file"
        ) from None
    if not data:
        raise _invalid("'file' decodes to 0 bytes: send the Base64 of the image or PDF file")
    return data


def _ocr_model(host: ModelHost) -> ServedModel:
    for name in host.names():
        served = host.get(name)
        if served.kind == "ocr":
            return served
    raise ServingError(
        "not_found",
        f"this server serves no OCR model, so {OCR_ENDPOINT} has nothing to run; it serves: "
        f"{', '.join(host.names()) or 'nothing'}",
    )


def _pruned_result(lines: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> dict:
    """One page's ``prunedResult``, with PaddleX's keys and layout."""
    polys = [[[int(x), int(y)] for x, y in line["box"]] for line in lines]
    boxes = [
        [min(p[0] for p in poly), min(p[1] for p in poly), max(p[0] for p in poly),
         max(p[1] for p in poly)]
        for poly in polys
    ]  # fmt: skip
    return {
        "model_settings": {
            "use_doc_preprocessor": False,
            "use_textline_orientation": settings["use_textline_orientation"],
        },
        # Only the boxes whose lines were kept (score >= text_rec_score_thresh).
        "dt_polys": polys,
        "text_det_params": {
            "limit_side_len": settings["det_limit_side_len"],
            "limit_type": settings["det_limit_type"],
            "thresh": settings["det_thresh"],
            "max_side_limit": settings["det_limit_side_len"],
            "box_thresh": settings["det_box_thresh"],
            "unclip_ratio": settings["det_unclip_ratio"],
        },
        "text_type": "general",
        "text_rec_score_thresh": settings["rec_score_thresh"],
        "return_word_box": False,
        "rec_texts": [line["text"] for line in lines],
        "rec_scores": [float(line["score"]) for line in lines],
        "rec_polys": polys,
        "rec_boxes": boxes,
    }


def _jpeg_b64(image: np.ndarray) -> str:
    h, w = image.shape[:2]
    scale = min(1.0, _MAX_OUTPUT_SIDE / max(h, w))
    if scale < 1.0:
        image = cv2.resize(image, (max(1, int(w * scale)), max(1, int(h * scale))))
    ok, encoded = cv2.imencode(".jpg", image)
    if not ok:
        raise RuntimeError("JPEG encoding of a result image failed")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def _page_images(
    request: _Request, settings: Mapping[str, Any], pages: Sequence[Sequence[Mapping[str, Any]]]
) -> list[tuple[str, str]]:
    """(inputImage, ocrImage) per page: the page, and the page with its boxes drawn."""
    out = []
    for index, lines in enumerate(pages):
        if request.is_pdf:
            page = render_pdf_page(
                request.data, index, settings["pdf_dpi"], settings["max_pdf_page_pixels"]
            )
        else:
            page = decode_image(request.data, settings["max_image_pixels"])
        drawn = page.copy()
        for line in lines:
            points = np.array(line["box"], np.int32).reshape(-1, 1, 2)
            cv2.polylines(drawn, [points], True, (0, 180, 0), 2)
        out.append((_jpeg_b64(page), _jpeg_b64(drawn)))
    return out


async def _result(request: _Request, result: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    sizes = list(result.page_sizes) or [(0, 0)]
    pages: list[list[Mapping[str, Any]]] = [[] for _ in sizes]
    for line in result.lines:
        pages[int(line.get("page", 1)) - 1].append(line)
    images: list[tuple[str | None, str | None]] = [(None, None)] * len(pages)
    if request.visualize:
        images = await asyncio.to_thread(_page_images, request, settings, pages)
    ocr_results = [
        {
            "prunedResult": _pruned_result(lines, settings),
            "ocrImage": ocr_image,
            "docPreprocessingImage": None,
            "inputImage": input_image,
        }
        for lines, (input_image, ocr_image) in zip(pages, images, strict=True)
    ]
    if request.is_pdf:
        data_info: dict[str, Any] = {
            "numPages": len(sizes),
            "pages": [{"width": w, "height": h} for w, h in sizes],
            "type": "pdf",
        }
    else:
        data_info = {"width": sizes[0][0], "height": sizes[0][1], "type": "image"}
    return {"ocrResults": ocr_results, "dataInfo": data_info}


def _log_id(header_request_id: str | None, document: Any) -> str:
    if header_request_id:
        return header_request_id
    body_id = document.get("logId") if isinstance(document, dict) else None
    if isinstance(body_id, str) and REQUEST_ID_PATTERN.fullmatch(body_id):
        return body_id
    return uuid.uuid4().hex


def _present_no_key() -> None:
    """This frontend makes the call's auth decision (the key comes in headers only)."""
    usage = current_usage()
    if usage is not None and usage.credential_hook is not None:
        usage.credential_hook(None)


async def answer_ocr(
    host: ModelHost,
    body: bytes,
    *,
    header_request_id: str | None,
    max_depth: int,
    url_hosts: frozenset[str] = frozenset(),
    max_fetch_bytes: int = 32 * 1024 * 1024,
) -> OcrHttpReply:
    """Answer one ``POST /ocr``; never raises: failures are ``{logId, errorCode, errorMsg}``.

    ``header_request_id`` is the caller's (already checked) ``x-request-id``;
    ``url_hosts`` the hosts a ``file`` URL may be fetched from (none: URLs refused)."""
    usage = current_usage()
    log_id = header_request_id or uuid.uuid4().hex

    def render(kind: str, message: str) -> tuple[int, bytes]:
        status = http_status(kind)
        return status, json.dumps(_error_body(log_id, status, message)).encode("utf-8")

    if usage is not None:
        usage.error_renderer = render
    try:
        try:
            document = parse_json(body or b"null", max_depth=max_depth)
        except ServingError as exc:
            _present_no_key()
            raise ServingError(exc.kind, f"{exc.message}; send a JSON object like "
                               '{"file": "<Base64>", "fileType": 1}') from None  # fmt: skip
        log_id = _log_id(header_request_id, document)
        _present_no_key()
        if not isinstance(document, dict):
            raise _invalid('the request body must be a JSON object like {"file": "<Base64>", '
                           '"fileType": 1}')  # fmt: skip
        served = _ocr_model(host)
        settings = served.adapter.settings()
        parsed: list[_Request] = []
        url = _url_of(document.get("file"))
        fetched: bytes | None = None
        if url is not None and url_hosts:
            try:
                allowed = _allowed_host(url, url_hosts)
            except ServingError:
                allowed = None  # refused in decode, as every other bad input
            if allowed is not None:
                fetched = await asyncio.to_thread(_download, url, allowed, max_fetch_bytes)

        def decode(codec: Codec) -> tuple[list[Any], list[bytes]]:
            if url is not None and fetched is None:
                _allowed_host(url, url_hosts)  # raises the refusal
            parsed.append(_parse_request(document, settings, fetched))
            return [parsed[0].data], [parsed[0].data]

        _, results = await run_model(host, served.name, decode, request_id=log_id)
        result = await _result(parsed[0], results[0], settings)
        return OcrHttpReply(
            200, {"logId": log_id, "errorCode": 0, "errorMsg": "Success", "result": result}
        )
    except Exception as exc:
        error = as_serving_error(exc)
        if usage is not None and usage.model is None:  # a failed call of the OCR model
            usage.model = next((n for n in host.names() if host.get(n).kind == "ocr"), None)
        if error.kind == "internal":
            log_internal(exc, header_request_id, surface="paddlex-ocr", path=OCR_ENDPOINT)
        status = http_status(error.kind)
        return OcrHttpReply(status, _error_body(log_id, status, error.message), http_headers(error))
