"""Every span attribute, metric name and bucket layout paddle-meter emits, in one place.

Names follow docs/design.md (``gen_ai.*``, ``paddle_meter.*``) plus the standard
OpenTelemetry RPC / HTTP semantic-convention names the transports use. Code that emits
telemetry imports from here and never spells a name inline, so a rename is one edit.
"""

from __future__ import annotations

from typing import Final

# --- GenAI semantic conventions -------------------------------------------------------
# Pinned: OpenTelemetry GenAI semantic conventions v1.37.0, where gen_ai.provider.name
# replaced gen_ai.system. Our provider value is "paddle" (a PaddlePaddle model served here).
GEN_AI_SEMCONV_VERSION: Final = "1.37.0"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_PROVIDER_PADDLE: Final = "paddle"
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
GEN_AI_TOKEN_TYPE_INPUT: Final = "input"
GEN_AI_TOKEN_TYPE_OUTPUT: Final = "output"

# --- paddle-meter span attributes ------------------------------------------------------
PADDLE_METER_TENANT: Final = "paddle_meter.tenant"
# The id of the API key that made the call (never the key itself); absent with auth off.
PADDLE_METER_API_KEY_ID: Final = "paddle_meter.api_key_id"
# Why an authentication or authorization failed (missing_key, unknown_key, revoked ...).
PADDLE_METER_AUTH_FAILURE: Final = "paddle_meter.auth.failure"
# Why a budget or rate limit refused the call (budget_exceeded, requests_per_minute,
# tokens_per_minute), on the span and on paddle_meter.limit.refusals.
PADDLE_METER_LIMIT_REFUSAL: Final = "paddle_meter.limit.refusal"
# Attributes of the budget gauges (and of the soft-limit span event).
PADDLE_METER_BUDGET_ID: Final = "paddle_meter.budget.id"
PADDLE_METER_BUDGET_METRIC: Final = "paddle_meter.budget.metric"
PADDLE_METER_BUDGET_PERIOD: Final = "paddle_meter.budget.period"
# Span event of the call whose usage crossed a budget's soft limit.
EVENT_BUDGET_SOFT_LIMIT: Final = "paddle_meter.budget.soft_limit"
PADDLE_METER_REQUEST_ID: Final = "paddle_meter.request_id"
PADDLE_METER_CHARACTERS: Final = "paddle_meter.characters"
PADDLE_METER_IMAGES: Final = "paddle_meter.images"
# Pages OCRed: 1 per image, N per N-page PDF (paddle_meter.images counts input files).
PADDLE_METER_PAGES: Final = "paddle_meter.pages"
PADDLE_METER_TRUNCATED: Final = "paddle_meter.truncated"
PADDLE_METER_BILLABLE_TOKENS: Final = "paddle_meter.billable_tokens"
PADDLE_METER_REQUEST_SIZE: Final = "paddle_meter.request.size"
PADDLE_METER_RESPONSE_SIZE: Final = "paddle_meter.response.size"
PADDLE_METER_COST: Final = "paddle_meter.cost"
PADDLE_METER_PRICE_ID: Final = "paddle_meter.price_id"
PADDLE_METER_MODEL_VERSION: Final = "paddle_meter.model_version"
PADDLE_METER_PROTOCOL: Final = "paddle_meter.protocol"
PADDLE_METER_APP_STATUS: Final = "paddle_meter.app_status"
# True on a replay: a retry of an id already billed with the same payload; the span then
# carries the ORIGINAL billed figures, and the call adds nothing to the token metrics.
PADDLE_METER_USAGE_REPLAY: Final = "paddle_meter.usage.replay"
# Metric attribute of paddle_meter.requests: "ok" or the error code (docs/design.md `status`).
PADDLE_METER_STATUS: Final = "status"

# --- standard RPC / HTTP / server semantic conventions ---------------------------------
RPC_SYSTEM: Final = "rpc.system"
RPC_SYSTEM_GRPC: Final = "grpc"
RPC_SERVICE: Final = "rpc.service"
RPC_METHOD: Final = "rpc.method"
RPC_GRPC_STATUS_CODE: Final = "rpc.grpc.status_code"
HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_ROUTE: Final = "http.route"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
URL_PATH: Final = "url.path"
URL_SCHEME: Final = "url.scheme"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
ERROR_TYPE: Final = "error.type"

# --- metric names (unit in the comment, as docs/design.md) -----------------------------
METRIC_TOKENS: Final = "paddle_meter.tokens"  # {token}
METRIC_REQUESTS: Final = "paddle_meter.requests"  # {request}
METRIC_GEN_AI_SERVER_REQUEST_DURATION: Final = "gen_ai.server.request.duration"  # s
METRIC_REQUEST_SIZE: Final = "paddle_meter.request.size"  # By
METRIC_RESPONSE_SIZE: Final = "paddle_meter.response.size"  # By
METRIC_RPC_SERVER_CALL_DURATION: Final = "rpc.server.call.duration"  # s
METRIC_HTTP_SERVER_REQUEST_DURATION: Final = "http.server.request.duration"  # s
METRIC_METER_ERRORS: Final = "paddle_meter.meter_errors"  # {error}
# Billed usage beyond tokens, for dashboards and alerts (ledger figures, as the tokens are):
# characters recognised (OCR), cost in the price table's currency (paddle_meter.currency),
# and inputs cut to the model's limit (ERNIE max_seq_len).
METRIC_CHARACTERS: Final = "paddle_meter.characters"  # {character}
METRIC_PAGES: Final = "paddle_meter.pages"  # {page}, OCR pages billed
METRIC_COST: Final = "paddle_meter.cost"  # {currency unit}, with paddle_meter.currency
METRIC_TRUNCATED_INPUTS: Final = "paddle_meter.truncated_inputs"  # {request}
PADDLE_METER_CURRENCY: Final = "paddle_meter.currency"
# Refused authentications and authorizations, by paddle_meter.auth.failure: {attempt}
METRIC_AUTH_FAILURES: Final = "paddle_meter.auth.failures"
# Calls refused by a budget or a rate limit, by paddle_meter.limit.refusal: {request}
METRIC_LIMIT_REFUSALS: Final = "paddle_meter.limit.refusals"
# Budget figures of the current period, in the budget's unit (cost: the price table's
# currency), by tenant, paddle_meter.budget.{id,metric,period}: gauges.
METRIC_BUDGET_USED: Final = "paddle_meter.budget.used"
METRIC_BUDGET_LIMIT: Final = "paddle_meter.budget.limit"
# The amount at which a budget's soft limit warns (only budgets with a soft limit).
METRIC_BUDGET_SOFT_LIMIT: Final = "paddle_meter.budget.soft_limit"
# Ledger health (registered when the ledger implements exporters.ledger.base.ReportsHealth).
METRIC_LEDGER_SPOOL_PENDING: Final = "paddle_meter.ledger.spool_pending"  # {record}, gauge
METRIC_LEDGER_WRITE_FAILURES: Final = "paddle_meter.ledger.write_failures"  # {record}
METRIC_LEDGER_COMMIT_DURATION: Final = "paddle_meter.ledger.commit.duration"  # s

# --- model stage span names ------------------------------------------------------------
# Defined beside the adapters (which never import exporters); re-exported so every name
# paddle-meter emits is findable here.
from models.stages import (  # noqa: E402, F401 (re-exported)
    STAGE_ERNIE_INFER,
    STAGE_ERNIE_TOKENIZE,
    STAGE_OCR_CLS,
    STAGE_OCR_DET,
    STAGE_OCR_REC,
    STAGE_OCR_REC_BATCH,
)

# --- usage sent back to the caller (gRPC trailing metadata / HTTP response headers) -----
HEADER_REQUEST_ID: Final = "x-request-id"
HEADER_USAGE_INPUT_TOKENS: Final = "x-usage-input-tokens"
HEADER_USAGE_OUTPUT_TOKENS: Final = "x-usage-output-tokens"
HEADER_USAGE_REPLAY: Final = "x-usage-replay"  # "true" on a replay, absent otherwise
HEADER_TENANT: Final = "x-tenant"

# --- histogram bucket boundaries ---------------------------------------------------------
# The GenAI semantic conventions' advice for gen_ai.server.request.duration.
GEN_AI_DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
# OTel's recommended boundaries for http.server.request.duration, also used for
# rpc.server.call.duration so both transports' latency panels line up.
TRANSPORT_DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
# Ledger commits (one fsync'd transaction for a batch): 0.5 ms to 10 s.
LEDGER_COMMIT_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Message sizes: powers of 4 from 64 B to 64 MiB (64 * 4**k, k = 0..10). Covers a tiny
# OIP health message up to a large scanned page at a constant relative resolution with
# eleven buckets; gRPC's default max message is 4 MiB, so the tail has headroom.
SIZE_BUCKETS: Final[tuple[float, ...]] = tuple(float(64 * 4**k) for k in range(11))

# --- tenant as a metric attribute is capped: bills come from the ledger, not from labels --
DEFAULT_TENANT_CAP: Final = 100
TENANT_OVERFLOW: Final = "_other"
DEFAULT_TENANT: Final = "default"
