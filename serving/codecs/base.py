"""The codec contract: protocol payload -> adapter batch, adapter results -> protocol payload."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serving.errors import ServingError

__all__ = ["Codec", "OutputTensor", "bytes_elements", "digest", "require_pipeline_key"]


@dataclasses.dataclass
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray


def digest(payloads: Sequence[bytes]) -> str:
    """sha256 over the request's payloads, so a record can be matched to its document."""
    h = hashlib.sha256()
    for payload in payloads:
        h.update(payload)
    return h.hexdigest()


def bytes_elements(inputs: Mapping[str, np.ndarray], name: str, what: str) -> list[str | bytes]:
    """The elements of BYTES input ``name`` (str from REST JSON, bytes otherwise).

    Any other datatype is refused: ``bytes(n)`` of a number would allocate n zero bytes
    (INT64 data of 10**15 would ask for a petabyte). ``what`` says what the input holds.
    """
    array = inputs[name]
    items = list(array.reshape(-1))
    if array.dtype != np.object_ or not all(isinstance(x, str | bytes) for x in items):
        raise ServingError(
            "invalid_argument", f"input {name!r} must be a BYTES tensor ({what}), not {array.dtype}"
        )
    return items


def require_pipeline_key(
    fields: Mapping[str, str], key: str, value_hint: str, extra: str = ""
) -> str:
    """The value of pipeline ``key``; else a ServingError saying what to send instead."""
    if key not in fields:
        raise ServingError(
            "invalid_argument",
            f"missing key {key!r}: send key [{key!r}] and value [{value_hint}]{extra}; "
            f"keys received: {sorted(fields) or 'none'}",
        )
    return fields[key]


class Codec(abc.ABC):
    #: operation recorded for this kind of model, unless the adapter says otherwise
    operation: str = ""

    def __init__(self, adapter: Any = None) -> None:
        # Some payload shapes depend on the model (an ERNIE classifier or embedder).
        self.adapter = adapter

    @abc.abstractmethod
    def oip_inputs(self) -> list[dict[str, Any]]:
        """OIP model metadata inputs: [{name, datatype, shape}] (-1 = variable)."""

    @abc.abstractmethod
    def oip_outputs(self) -> list[dict[str, Any]]:
        """OIP model metadata outputs."""

    @abc.abstractmethod
    def from_oip(self, inputs: Mapping[str, np.ndarray]) -> tuple[list[Any], list[bytes]]:
        """Adapter batch and the raw payloads (for content_sha256); raises ServingError."""

    @abc.abstractmethod
    def to_oip(self, results: Sequence[Any]) -> list[OutputTensor]:
        """Output tensors for a batch of successful results."""

    @abc.abstractmethod
    def from_pipeline(self, fields: Mapping[str, str]) -> tuple[list[Any], list[bytes]]:
        """Adapter batch from pipeline key/value pairs; raises ServingError."""

    @abc.abstractmethod
    def to_pipeline(self, results: Sequence[Any]) -> dict[str, str]:
        """Pipeline response keys -> values for a batch of successful results."""

    def content(self, items: Sequence[Any], results: Sequence[Any]) -> str | None:
        """Text to keep in the ledger when content recording is on."""
        return None
