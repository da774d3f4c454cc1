"""The Open Inference Protocol v2 translator, shared by the gRPC and the REST frontend.

A transport parses its wire form into neutral :class:`Tensor` / :class:`RequestedOutput`
values and frames what comes back; what OIP means is decided here, once: server and model
metadata, decoding input tensors, running the model, choosing the requested outputs and
encoding each one raw (binary) or as JSON data. Every failure is raised as a ServingError,
which the transport turns into its status code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from interceptors.request_id import checked_protocol_request_id
from serving.codecs.base import OutputTensor
from serving.dispatch import run_model
from serving.errors import ServingError, as_serving_error
from serving.model_host import ModelHost
from serving.oip_tensors import decode_raw, encode_raw, from_json_data, to_json_data
from serving.version import SERVER_NAME, SERVER_VERSION

__all__ = [
    "InferResult",
    "RequestedOutput",
    "Tensor",
    "infer",
    "model_metadata",
    "model_ready",
    "server_metadata",
]

_EXTENSIONS = ["binary_tensor_data"]
_PLATFORM = "paddle_inference"


@dataclasses.dataclass
class Tensor:
    """One tensor as it travels: an input a transport parsed, or an output for it to frame.
    Exactly one of ``raw`` / ``data`` is set."""

    name: str
    datatype: str
    shape: list[int]
    #: the raw layout: gRPC raw_input_contents / raw_output_contents, or a REST binary chunk
    raw: bytes | None = None
    #: REST JSON ``data`` (inputs: nested or flat) or gRPC typed ``contents`` values
    data: Any = None


@dataclasses.dataclass(frozen=True)
class RequestedOutput:
    name: str
    #: send this output raw; None: the request's default
    binary: bool | None = None


@dataclasses.dataclass
class InferResult:
    model_name: str
    model_version: str
    outputs: list[Tensor]


def server_metadata() -> dict[str, Any]:
    """OIP server metadata: name, version, extensions."""
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(_EXTENSIONS)}


def model_metadata(host: ModelHost, name: str) -> dict[str, Any]:
    """OIP model metadata of ``name``; raises ServingError (not_found) for an unknown model."""
    model = host.get(name)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": _PLATFORM,
        "inputs": model.codec.oip_inputs(),
        "outputs": model.codec.oip_outputs(),
    }


def model_ready(host: ModelHost, name: str) -> dict[str, Any]:
    """``{"name", "ready"}`` for ``name``; raises ServingError (not_found) for an unknown model."""
    return {"name": name, "ready": host.get(name).adapter.is_ready()}


def _decode(tensors: Iterable[Tensor]) -> dict[str, np.ndarray]:
    decoded: dict[str, np.ndarray] = {}
    for t in tensors:
        if t.raw is not None:
            decoded[t.name] = decode_raw(t.name, t.datatype, t.shape, t.raw)
        else:
            decoded[t.name] = from_json_data(t.name, t.datatype, t.shape, t.data)
    return decoded


def _select(
    tensors: Sequence[OutputTensor], requested: Sequence[RequestedOutput], binary_default: bool
) -> list[Tensor]:
    # No outputs named: all of them. A name asked twice: the last ask wins.
    wanted = {o.name: o for o in requested}
    selected = []
    for tensor in tensors:
        if wanted and tensor.name not in wanted:
            continue
        ask = wanted.get(tensor.name)
        binary = binary_default if ask is None or ask.binary is None else ask.binary
        out = Tensor(tensor.name, tensor.datatype, list(tensor.array.shape))
        if binary:
            out.raw = encode_raw(tensor.datatype, tensor.array)
        else:
            out.data = to_json_data(tensor.datatype, tensor.array)
        selected.append(out)
    return selected


async def infer(
    host: ModelHost,
    name: str,
    inputs: Iterable[Tensor],
    *,
    outputs: Sequence[RequestedOutput] = (),
    binary_default: bool = True,
    request_id: str | None = None,
) -> InferResult:
    """Run one OIP inference request on model ``name``; raises ServingError only.

    ``inputs`` is iterated after the model is looked up, so a transport may parse lazily (a
    generator) and a malformed tensor is still metered against the model it asked for.
    ``outputs`` names the outputs to send (none: all), each raw or not; ``binary_default``
    is for those that do not say.
    """
    request_id = checked_protocol_request_id(request_id)
    try:
        served, results = await run_model(
            host, name, lambda codec: codec.from_oip(_decode(inputs)), request_id=request_id
        )
        selected = _select(served.codec.to_oip(results), outputs, binary_default)
    except ServingError:
        raise
    except Exception as exc:
        raise as_serving_error(exc) from exc
    return InferResult(served.name, served.version, selected)
