"""Coverage-guided fuzzing (atheris) of the request parsers, in process, from the seed corpus.

What is fuzzed is the code between the wire and the model: the OIP REST body parsing of
serving/http_app.py (JSON and Triton's binary extension), the pipeline JSON body, the
OIP tensor decoding of serving/oip_tensors.py (via serving/oip.py), the OIP gRPC input
reading of serving/oip_grpc.py, the pipeline field pairing of serving/pipeline.py and the
codecs of serving/codecs/ (OCR and ERNIE). The one property: only the documented exceptions
escape (:class:`serving.errors.ServingError`, :class:`models.base.ModelError`); anything
else is what a frontend turns into a 500 / INTERNAL. Protobuf bytes that do not decode are
skipped here: refusing them is the gRPC transport's job, fuzzed live in tests/test_fuzz.py.

The test runs this file as a subprocess (``python tests/test_fuzz_parsers.py --atheris
<findings dir> <libFuzzer args> <corpus dir>``) for a bounded number of runs with a fixed
seed, so CI is reproducible; ``PADDLE_METER_FUZZ_EXAMPLES=N`` makes it N * 500 runs. Each
distinct undocumented exception (type and raising line) is written to the findings dir with
the shortest input seen, and the run goes on, so one failure message lists them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: target name (the seed file prefix) per selector byte: the first byte of a fuzz input
TARGETS = ["oip_json", "oip_binary", "pipeline_json", "oip_grpc", "pipeline_grpc"]
DEFAULT_RUNS = 20_000  # a few seconds at a few thousand runs/s
MAX_LEN = 8192


def _seed_inputs(directory: Path) -> Path:
    """The corpus as atheris inputs: selector byte + payload (binary-extension seeds also
    carry their 2-byte header length)."""
    from support import fuzzing as fz

    directory.mkdir(parents=True, exist_ok=True)
    for name, data in fz.seeds().items():
        target = name.split("--", 1)[0]
        if target not in TARGETS:
            continue  # image seeds: the live fuzzing sends those inside requests
        if target == "oip_binary":
            data = fz.binary_header_length(data).to_bytes(2, "big") + data
        (directory / name).write_bytes(bytes([TARGETS.index(target)]) + data[:MAX_LEN])
    return directory


def test_request_parsers_raise_only_documented_errors(tmp_path):
    from support import fuzzing as fz

    wanted = os.environ.get("PADDLE_METER_FUZZ_EXAMPLES")
    runs = int(wanted) * 500 if wanted else DEFAULT_RUNS
    corpus = _seed_inputs(tmp_path / "corpus")
    findings = tmp_path / "findings"
    findings.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--atheris",
            str(findings),
            f"-runs={runs}",
            "-seed=1",
            f"-max_len={MAX_LEN}",
            f"-dict={fz.CORPUS_DIR / 'parsers.dict'}",
            "-rss_limit_mb=3072",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    found = [f.read_text(encoding="utf-8") for f in sorted(findings.iterdir())]
    assert not found, (
        f"{len(found)} undocumented exception(s) escaped the parsers:\n\n" + "\n\n".join(found)
    )
    assert proc.returncode == 0, f"atheris exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    assert f"Done {runs} runs" in proc.stderr, proc.stderr[-3000:]


# --- the fuzz target (runs only in the subprocess) -------------------------------------------


def _harness(findings: Path) -> Any:
    import atheris

    # Instrument only this project's code: coverage guidance where the parsing is.
    with atheris.instrument_imports(include=["serving", "models"]):
        from starlette.requests import Request
        from tritonclient.grpc import service_pb2

        from models.base import ModelError
        from serving import http_app, oip, oip_grpc, pipeline
        from serving.codecs.ernie import ErnieCodec
        from serving.codecs.ocr import OcrCodec
        from serving.errors import ServingError
        from serving.proto import pipeline_service_pb2 as pipeline_pb
    from google.protobuf.message import DecodeError

    codecs = [OcrCodec(), ErnieCodec()]
    loop = asyncio.new_event_loop()
    depth = http_app.DEFAULT_MAX_JSON_DEPTH  # server.max_json_depth's default

    def to_codecs_oip(tensors: Any) -> None:
        decoded = oip._decode(tensors)
        for codec in codecs:
            with contextlib.suppress(ServingError, ModelError):
                codec.from_oip(decoded)

    def oip_rest(body: bytes, header_length: str | None) -> None:
        document, binary = http_app._parse_oip_body(body, header_length, depth)
        http_app._requested_outputs(document)
        to_codecs_oip(list(http_app._read_inputs(document, binary)))

    def pipeline_fields(keys: Any, values: Any, tensors: Any) -> None:
        fields = pipeline._fields(keys, values, tensors)
        for codec in codecs:
            with contextlib.suppress(ServingError, ModelError):
                codec.from_pipeline(fields)

    def pipeline_json(body: bytes) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/ocr/prediction",
            "headers": [],
            "query_string": b"",
        }
        document = loop.run_until_complete(
            http_app._json_object(Request(scope, receive), "{...}", depth)
        )
        pipeline_fields(document.get("key") or [], document.get("value") or [], ())

    def oip_grpc_request(data: bytes) -> None:
        try:
            request = service_pb2.ModelInferRequest.FromString(data)
        except DecodeError:
            return
        [oip.RequestedOutput(o.name) for o in request.outputs]
        to_codecs_oip(list(oip_grpc._read_inputs(request)))

    def pipeline_grpc_request(data: bytes) -> None:
        try:
            request = pipeline_pb.Request.FromString(data)
        except DecodeError:
            return
        pipeline_fields(request.key, request.value, request.tensors)

    shortest: dict[str, int] = {}

    def record(target: str, payload: bytes, exc: Exception) -> None:
        # One file per distinct failure (exception type and where it was raised), with the
        # shortest input seen: the run goes on and reports them all at once.
        frames = traceback.extract_tb(exc.__traceback__)
        where = frames[-1] if frames else None
        place = f"{Path(where.filename).name}:{where.lineno} in {where.name}" if where else "?"
        key = hashlib.sha1(f"{type(exc).__name__}@{place}".encode()).hexdigest()[:12]
        if shortest.get(key, len(payload) + 1) <= len(payload):
            return
        shortest[key] = len(payload)
        (findings / f"{key}.txt").write_text(
            f"{type(exc).__name__}: {exc} at {place}\n  target {target}, input {payload[:400]!r}\n"
            + "".join(traceback.format_exception(exc)[-6:]),
            encoding="utf-8",
        )

    def one_input(data: bytes) -> None:
        if not data:
            return
        target, payload = TARGETS[data[0] % len(TARGETS)], data[1:]
        try:
            if target == "oip_json":
                oip_rest(payload, None)
            elif target == "oip_binary":
                oip_rest(payload[2:], str(int.from_bytes(payload[:2], "big")))
            elif target == "pipeline_json":
                pipeline_json(payload)
            elif target == "oip_grpc":
                oip_grpc_request(payload)
            else:
                pipeline_grpc_request(payload)
        except (ServingError, ModelError):
            pass  # documented: the frontends answer these with their status codes
        except Exception as exc:  # what a frontend would answer 500 / INTERNAL
            record(target, payload, exc)

    return atheris, one_input


if __name__ == "__main__" and sys.argv[1:2] == ["--atheris"]:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    atheris_module, target = _harness(Path(sys.argv[2]))
    atheris_module.Setup([sys.argv[0], *sys.argv[3:]], target)
    atheris_module.Fuzz()
