"""Call a pipeline server with Paddle Serving 0.9's REAL client; print one JSON line.

Run with the Python 3.9 venv that holds paddle-serving-server 0.9.0
(scripts/setup_ps_client_venv.sh), never with the main venv:

    .venv-ps39/bin/python tests/tools/ps_pipeline_client.py \
        --addr 127.0.0.1:18090 --name ocr --image doc.png [--logid 7] [--http]

gRPC mode does what Paddle Serving's OCR pipeline example client
(examples/Pipeline/PaddleOCR/ocr/pipeline_rpc_client.py) does:
``PipelineClient().connect([addr])`` then
``predict(feed_dict={"image": base64}, fetch=["res"])``. That client never sets
``Request.name``, so ``--name`` is only put on the wire with ``--rpc-set-name``
(the request is still packed by the client's own ``_pack_request_package`` and
sent through its generated stub), which is how a name mismatch is exercised.
HTTP mode does what the example's pipeline_http_client.py does: POST
``{"key": ["image"], "value": [base64]}`` as JSON to ``http://addr/{name}/prediction``.

``--api-key-env NAME`` sends the API key held in the environment variable NAME the only
way this client can: as the feed key ``api_key`` next to ``image`` (gRPC: in
``feed_dict``; HTTP: in the key/value lists). It is read from the environment so that it
never shows in a process listing.

Stdout carries exactly one line, {"err_no", "err_msg", "key", "value"};
the client library's own chatter goes to stderr. Exit status 0 whenever a
response arrived (whatever its err_no), 2 on a transport failure.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
import tempfile


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True, help="host:port of the pipeline server")
    parser.add_argument("--name", default="ocr", help="pipeline service name (HTTP path)")
    parser.add_argument("--image", required=True, help="image file to send")
    parser.add_argument("--logid", type=int, default=None, help="Request.logid")
    parser.add_argument("--http", action="store_true", help="use the HTTP JSON gateway")
    parser.add_argument(
        "--rpc-set-name",
        action="store_true",
        help="gRPC only: also send --name in Request.name (the stock client leaves it empty)",
    )
    parser.add_argument(
        "--api-key-env", default=None, metavar="NAME",
        help="send the API key in this environment variable as the feed key api_key",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    return parser.parse_args(argv)


def _image_base64(path):
    # Same as the example's cv2_to_base64(): base64 of the raw file bytes.
    with open(path, "rb") as handle:
        return base64.b64encode(handle.read()).decode("utf8")


def _feed(args, image):
    """The feed dict: the image, and the API key when asked for."""
    feed = {"image": image}
    if args.api_key_env:
        feed["api_key"] = os.environ[args.api_key_env]
    return feed


def _call_grpc(args, image):
    # Paddle Serving's pipeline logger creates ./PipelineServingLogs at import
    # time unless SERVING_LOG_PATH points elsewhere; keep the caller's cwd clean.
    # Importing paddle_serving_server.pipeline does NOT download the C++
    # serving binary (only Server.run_server does), so no other env is needed.
    os.environ.setdefault(
        "SERVING_LOG_PATH", os.path.join(tempfile.gettempdir(), "ps_pipeline_client")
    )
    import grpc
    from paddle_serving_server.pipeline import PipelineClient

    client = PipelineClient()
    client.connect([args.addr])
    log_id = args.logid if args.logid is not None else 0
    try:
        if args.rpc_set_name:
            request = client._pack_request_package(
                _feed(args, image), pack_tensor_format=False, use_tensor_bytes=False, profile=False
            )
            request.logid = log_id
            request.name = args.name
            response = client._stub.inference(request, timeout=args.timeout)
        else:
            response = client.predict(feed_dict=_feed(args, image), fetch=["res"], log_id=log_id)
    except grpc.RpcError as exc:
        raise _TransportError(f"grpc {exc.code()}: {exc.details()}") from exc
    return {
        "err_no": response.err_no,
        "err_msg": response.err_msg,
        "key": list(response.key),
        "value": list(response.value),
    }


def _call_http(args, image):
    import requests

    url = f"http://{args.addr}/{args.name}/prediction"
    feed = _feed(args, image)
    data = {"key": list(feed), "value": list(feed.values())}
    if args.logid is not None:
        data["logid"] = args.logid
    try:
        reply = requests.post(url=url, data=json.dumps(data), timeout=args.timeout)
        body = reply.json()
    except (requests.RequestException, ValueError) as exc:
        raise _TransportError(f"http: {exc}") from exc
    # proto3 JSON omits default values, so a success may carry no err_no.
    return {
        "err_no": int(body.get("err_no", 0)),
        "err_msg": body.get("err_msg", ""),
        "key": list(body.get("key", [])),
        "value": list(body.get("value", [])),
    }


class _TransportError(Exception):
    """No pipeline Response arrived (connection refused, deadline, bad body)."""


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    image = _image_base64(args.image)
    real_stdout = sys.stdout
    try:
        # PipelineClient.predict print()s timings; stdout must stay one JSON line.
        with contextlib.redirect_stdout(sys.stderr):
            result = _call_http(args, image) if args.http else _call_grpc(args, image)
    except _TransportError as exc:
        real_stdout.write(json.dumps({"error": str(exc)}) + "\n")
        return 2
    real_stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
