"""Transport metering: one core, a grpc.aio interceptor and a pure ASGI middleware.

Wiring (serving/metering_setup.py builds these once per process)::

    telemetry = setup_telemetry(TelemetryConfig.from_mapping(config["telemetry"]))
    core = MeteringCore.from_config(config["metering"], telemetry, ledger=sink,
                                    pricebook=prices)
    server = grpc.aio.server(interceptors=[MeteringServerInterceptor(core)])
    app = MeteringMiddleware(fastapi_app, core)      # outermost ASGI layer
    # GET /metrics: telemetry.render_metrics() -> (body, content_type)
    # shutdown: core.close(); telemetry.shutdown(); then the ledger's shutdown()

Modules: core.py (the core, opening calls), call.py (one call's lifecycle), request_id.py
(id and tenant policy), billing_policy.py (what is billed, pricing, replays, failing
closed), record.py (the usage record), telemetry_out.py (span attributes and metrics),
response_meta.py (usage headers / trailers), instruments.py (metric instruments,
tenant-label cap), ledger_metrics.py (ledger health as metrics), grpc_aio.py and asgi.py
(the transports).

Contract with the frontends (serving/):

- The transport layer opens one metered call per request, creates a
  ``models.usage.RequestUsage`` and binds it (``bind_usage``) around the whole handler,
  together with the server span as the current OTel span. ``asyncio.to_thread`` copies
  the context, so inference in a worker thread sees the same RequestUsage and its
  ``stage()`` spans are children of the server span.
- Model calls set on ``current_usage()`` (serving/dispatch.py, as its first step, before
  validating, so a failed model call is still recorded with zero billable tokens):
  ``model``, ``model_version``, ``operation`` (the served model's: ``ocr`` /
  ``text_classification`` / ``embeddings``; ``tokenize`` for token counting);
  ``request_id`` when the protocol body carries one (pipeline ``logid`` when non-zero,
  OIP ``id`` when non-empty). An ``x-request-id`` header/metadata wins over it; with
  neither, a UUID4 hex is generated. Ids must match ``[A-Za-z0-9._:-]{1,128}``: a
  malformed ``x-request-id`` (or ``x-tenant``, ``[A-Za-z0-9._-]{1,64}``) is refused with
  INVALID_ARGUMENT / 400 before the handler runs; a malformed protocol id is replaced.
- The billing key is (tenant, request id). A successful retry of a billed key with the
  same ``content_sha256`` is a replay (served, told the ORIGINAL usage, ``x-usage-replay:
  true``, not added to token metrics), at most ``metering.max_replays`` times (default
  10); a different payload, or one replay too many, is refused: ALREADY_EXISTS / 409, or
  ``usage.error_renderer(kind, message)``'s answer when the frontend set one (pipeline).
- Liveness, readiness and metadata calls (OIP ServerLive / ServerReady / ModelReady /
  ServerMetadata / ModelMetadata) set nothing: no model, so no ledger record and no
  usage headers. gRPC health and reflection services get operation ``health`` /
  ``reflection`` from the interceptor itself. The ASGI middleware does not meter
  ``/metrics``, ``/v2/health/*`` or ``/favicon.ico`` at all (``default_skip``).
- ``app_status`` (e.g. ``"err_no=3002"``) when the transport succeeded but the
  application failed (pipeline answers HTTP 200 / gRPC OK with err_no != 0): the call
  counts as an error with zero billable tokens and that status.
- ``content_sha256`` = sha256 hex of the request payload (image bytes / text), set by the
  frontend; ``content`` may be set too, and the core drops it unless the operator turned
  ``record_content`` on. Model adapters add input/output tokens, characters, images,
  truncated through ``RequestUsage.add`` / ``report_usage``.
- A call goes to the ledger only when ``usage.model`` is set and ``operation`` is not
  ``health`` / ``reflection`` / ``metadata`` / ``tokenize`` (billing_policy.py): bills
  only carry model calls. Every metered call gets a span and metrics.
- The usage record is written (``await ledger.submit``) before the response leaves. If
  the ledger cannot make it durable the request fails: gRPC UNAVAILABLE / HTTP 503 with
  "usage could not be recorded; retry with the same x-request-id". A call whose metering
  cannot start is not served (UNAVAILABLE / 503, "metering could not start; nothing was
  served; retry"), nor is a model call while the ledger cannot accept records. Any other
  failure inside metering is logged, counted in ``paddle_meter.meter_errors``, and ignored.
- Back to the caller: gRPC trailing metadata / HTTP response headers ``x-request-id``,
  ``x-usage-input-tokens``, ``x-usage-output-tokens`` (billed counts: 0 on errors; a
  replay's original counts, with ``x-usage-replay: true``) on
  every model call (billable, or any call that reported tokens). Other calls (health,
  metadata, ServerLive, reflection) carry no usage: they get ``x-request-id`` only when
  the request carried an id (header or protocol id), echoed, and no usage headers;
  their span still records a request id (generated when none was carried).
- Span status is ERROR for every non-OK gRPC code and every HTTP status >= 400 (a bad
  request is a failed, unbilled call), and for a non-empty ``app_status``.
- ``metering.enabled: false`` (``MeteringCore(None, enabled=False)``): transports pass straight
  through; no span, no record, no stage hook, and ``current_usage()`` is None in the
  handler, so frontends write ``if (u := current_usage()) is not None: u.model = ...``
  (adapters use ``report_usage``, already a no-op then).
"""

from interceptors.asgi import MeteringMiddleware, default_skip
from interceptors.billing_policy import LEDGER_FAILURE_MESSAGE, START_FAILURE_MESSAGE
from interceptors.call import MeteredCall
from interceptors.core import MeteringCore, default_tenant_resolver
from interceptors.grpc_aio import MeteringServerInterceptor

__all__ = [
    "LEDGER_FAILURE_MESSAGE",
    "START_FAILURE_MESSAGE",
    "MeteredCall",
    "MeteringCore",
    "MeteringMiddleware",
    "MeteringServerInterceptor",
    "default_skip",
    "default_tenant_resolver",
]
