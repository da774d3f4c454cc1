"""Per-request metering context that model adapters and frontends report into.

The metering core (interceptors/) opens one :class:`RequestUsage` per incoming call and
binds it to a contextvar. Frontends fill in what only they know (model, operation, the
protocol-level request id, an application status such as the pipeline ``err_no``);
model adapters add the usage they measured (tokens, characters, images, pages). Nothing here
imports OpenTelemetry: stage spans go through a hook the metering core installs, so
adapters stay usable (and testable) without any telemetry configured.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

__all__ = [
    "RequestUsage",
    "StageFactory",
    "UsageEstimate",
    "bind_usage",
    "current_usage",
    "report_usage",
    "set_stage_factory",
    "stage",
    "trace_link",
]


@dataclasses.dataclass(frozen=True)
class UsageEstimate:
    """What a request will consume, as far as it is known before inference: an ERNIE
    adapter knows its exact input tokens (it tokenizes first); an OCR adapter knows only
    its input files (``images``) and their ``pages`` (a PDF's page count is read without
    rendering; their characters come out of recognition)."""

    input_tokens: int = 0
    images: int = 0
    pages: int = 0


@dataclasses.dataclass
class RequestUsage:
    """What one request consumed and what it was, filled in while it is served."""

    request_id: str | None = None
    model: str | None = None
    model_version: str | None = None
    operation: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    characters: int = 0
    images: int = 0
    # Pages OCRed: 1 per image, N per N-page PDF (``images`` counts input files).
    pages: int = 0
    truncated: bool = False
    # Application-level failure inside a transport-level success (pipeline err_no != 0).
    app_status: str | None = None
    content: str | None = None
    content_sha256: str | None = None
    # Opaque trace handle of the request span, so batch spans can link back to it.
    trace_link: Any = None
    # Set by a frontend whose protocol answers errors in its body (the pipeline):
    # ``error_renderer(kind, message)`` builds that answer when metering refuses the call
    # after the handler ran (an idempotency conflict). HTTP: returns ``(status, body)``
    # with a JSON body; gRPC: the response message, sent with status OK. None: the
    # transport answers with the kind's own gRPC code / HTTP status and {"error": message}.
    error_renderer: Callable[[str, str], Any] | None = None
    # Set by the metering core while the call may still present its API key in the request
    # body (Paddle Serving's PipelineClient cannot send headers): the frontend calls
    # ``credential_hook(key_or_None)`` before any model work; it raises the refusal
    # (a ServingError) or admits the call and clears itself. None: nothing to present.
    credential_hook: Callable[[str | None], None] | None = None
    # Set by the metering core while budgets or rate limits may apply: the dispatcher
    # awaits ``admission_hook(served_model, items)`` after decoding and before inference;
    # it reserves the call's usage or raises the refusal (a ServingError).
    admission_hook: Callable[[Any, Sequence[Any]], Awaitable[None]] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(
        self,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        characters: int = 0,
        images: int = 0,
        pages: int = 0,
        truncated: bool = False,
    ) -> None:
        """Accumulate usage; called once per item of a batch, so it adds rather than sets."""
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.characters += characters
        self.images += images
        self.pages += pages
        self.truncated = self.truncated or truncated


_current: contextvars.ContextVar[RequestUsage | None] = contextvars.ContextVar(
    "paddle_meter_request_usage", default=None
)


def current_usage() -> RequestUsage | None:
    """The usage object of the request being served, or None outside a metered call."""
    return _current.get()


@contextlib.contextmanager
def bind_usage(usage: RequestUsage) -> Iterator[RequestUsage]:
    """Make ``usage`` the current request's usage for the duration of the block."""
    token = _current.set(usage)
    try:
        yield usage
    finally:
        _current.reset(token)


def report_usage(**fields: Any) -> None:
    """Add usage to the current request; a no-op when nothing is metering (e.g. bench)."""
    usage = _current.get()
    if usage is not None:
        usage.add(**fields)


def trace_link() -> Any:
    """The current request's opaque trace handle (None when not traced)."""
    usage = _current.get()
    return None if usage is None else usage.trace_link


StageFactory = Callable[[str, Mapping[str, Any], Sequence[Any]], AbstractContextManager[Any]]
_stage_factory: StageFactory | None = None


def set_stage_factory(factory: StageFactory | None) -> None:
    """Install (or remove, with None) the hook that turns stages into child spans."""
    global _stage_factory
    _stage_factory = factory


def stage(
    name: str, attributes: Mapping[str, Any] | None = None, links: Sequence[Any] = ()
) -> AbstractContextManager[Any]:
    """Context manager around one model stage (``ocr.det``, ``ernie.infer`` ...).

    Never raises on its own; without a factory installed it costs one function call.
    ``links`` are handles from :func:`trace_link` of the requests a batch serves.
    """
    factory = _stage_factory
    if factory is None:
        return contextlib.nullcontext()
    return factory(name, attributes or {}, links)
