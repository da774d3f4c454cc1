"""The one contract every model adapter implements, and the errors it may return.

Shaped like Triton's python backend: ``load`` once, ``infer`` a batch and get one result
or one error per item (a bad item never takes its batch down), ``close`` once. ``infer``
blocks (it runs Paddle) and must be called off the event loop.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["InvalidInput", "ModelAdapter", "ModelError", "ResourceLimit"]


class ModelError(Exception):
    """A per-item failure; frontends map ``kind`` to a gRPC code / HTTP status / err_no."""

    kind = "internal"


class InvalidInput(ModelError):
    """The caller sent something the model cannot use (not an image, empty text ...)."""

    kind = "invalid_argument"


class ResourceLimit(ModelError):
    """The input is over a configured limit (pixels, sequence length, size)."""

    kind = "resource_exhausted"


class ModelAdapter(abc.ABC):
    """A served model: one instance per configured model name, shared by all frontends."""

    #: operation as recorded in the ledger: ocr / text_classification / embeddings
    operation: str = ""

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.options = dict(options)
        self.version = str(self.options.get("version", "1"))

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights and build predictors; called once before serving. Blocks."""

    @abc.abstractmethod
    def infer(self, batch: Sequence[Any]) -> list[Any]:
        """Run a batch; return one result or one :class:`ModelError` per item. Blocks."""

    def close(self) -> None:  # noqa: B027 - optional hook: adapters without resources skip it
        """Release predictors; idempotent."""

    @abc.abstractmethod
    def is_ready(self) -> bool:
        """True once ``load`` succeeded and until ``close``."""
