"""The Open Inference Protocol v2 translator, shared by the gRPC and the REST frontend.

A transport parses its wire form into neutral :class:`Tensor` / :class:`RequestedOutput`
values and frames what comes back; what OIP means is decided here, once: server and model
metadata, model versions, decoding input tensors, running the model, choosing the requested
outputs and encoding each one raw (binary) or as JSON data, and Triton's model-configuration
and statistics extensions. Every failure is raised as a ServingError, which the transport
turns into its status code.

Versions: a model has one version (its adapter's ``version`` option, default "1"); a request
naming no version or that one is served, any other is refused ``not_found`` with Triton's
words ("Request for unknown model: 'ocr' version 7 is not found"), before metering hears of
it. A requested output the model does not have is ``invalid_argument`` ("unexpected
inference output 'x' for model 'ocr'"), as Triton answers, checked before any model work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from interceptors.model_statistics import PROCESS_STATISTICS, ModelStatistics, timed
from interceptors.request_id import checked_protocol_request_id
from serving.codecs.base import OutputTensor
from serving.dispatch import run_model
from serving.errors import ServingError, as_serving_error
from serving.model_host import ModelHost, ServedModel
from serving.oip_config import model_config as _model_config
from serving.oip_config import platform
from serving.oip_tensors import decode_raw, encode_raw, from_json_data, to_json_data
from serving.version import SERVER_NAME, SERVER_VERSION

__all__ = [
    "EXTENSIONS",
    "InferResult",
    "RequestedOutput",
    "Tensor",
    "infer",
    "model_config",
    "model_metadata",
    "model_ready",
    "model_statistics",
    "served_model",
    "server_metadata",
]

#: the Triton extensions offered, as ``GET /v2`` / ServerMetadata advertise them
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")


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
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}


def served_model(host: ModelHost, name: str, version: str | None = None) -> ServedModel:
    """Model ``name`` at ``version`` (None or "": the one it has); ServingError
    ``not_found`` for an unknown model or version."""
    served = host.get(name)
    if version and version != served.version:
        raise ServingError(
            "not_found", f"Request for unknown model: '{name}' version {version} is not found"
        )
    return served


def model_metadata(host: ModelHost, name: str, version: str | None = None) -> dict[str, Any]:
    """OIP model metadata of ``name``; raises ServingError (not_found) for an unknown model
    or version."""
    model = served_model(host, name, version)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": platform(model),
        "inputs": model.codec.oip_inputs(),
        "outputs": model.codec.oip_outputs(),
    }


def model_ready(host: ModelHost, name: str, version: str | None = None) -> dict[str, Any]:
    """``{"name", "ready"}`` for ``name``; raises ServingError (not_found) for an unknown
    model. A version the model does not have is not ready (as Triton answers)."""
    model = host.get(name)
    ready = (not version or version == model.version) and model.adapter.is_ready()
    return {"name": name, "ready": ready}


def model_config(host: ModelHost, name: str, version: str | None = None) -> dict[str, Any]:
    """Triton's model configuration of ``name`` (serving/oip_config.py)."""
    return _model_config(served_model(host, name, version))


def model_statistics(
    host: ModelHost,
    name: str | None = None,
    version: str | None = None,
    statistics: ModelStatistics = PROCESS_STATISTICS,
) -> dict[str, Any]:
    """Triton's ``{"model_stats": [...]}``: every model (no name) or one model (version
    checked), from the statistics the metering core keeps (interceptors/model_statistics.py)."""
    models = [served_model(host, name, version)] if name else [host.get(n) for n in host.names()]
    return {"model_stats": [statistics.model_stat(m.name, m.version) for m in models]}


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


def _check_outputs(served: ServedModel, requested: Sequence[RequestedOutput]) -> None:
    if not requested:
        return
    known = {tensor["name"] for tensor in served.codec.oip_outputs()}
    for output in requested:
        if output.name not in known:
            raise ServingError(
                "invalid_argument",
                f"unexpected inference output '{output.name}' for model '{served.name}'",
            )


async def infer(
    host: ModelHost,
    name: str,
    inputs: Iterable[Tensor],
    *,
    outputs: Sequence[RequestedOutput] = (),
    binary_default: bool = True,
    request_id: str | None = None,
    version: str | None = None,
) -> InferResult:
    """Run one OIP inference request on model ``name``; raises ServingError only.

    ``inputs`` is iterated after the model is looked up, so a transport may parse lazily (a
    generator) and a malformed tensor is still metered against the model it asked for.
    ``outputs`` names the outputs to send (none: all; a name the model lacks is refused
    before inference), each raw or not; ``binary_default`` is for those that do not say.
    ``version``: the version the request names (None or "": any); another than the
    model's is refused ``not_found`` before metering hears of the call.
    """
    request_id = checked_protocol_request_id(request_id)
    model = served_model(host, name, version)

    def decode(codec: Any) -> Any:
        _check_outputs(model, outputs)  # inside metering: recorded against the model
        return codec.from_oip(_decode(inputs))

    try:
        served, results = await run_model(host, name, decode, request_id=request_id)
        with timed("compute_output"):
            selected = _select(served.codec.to_oip(results), outputs, binary_default)
    except ServingError:
        raise
    except Exception as exc:
        raise as_serving_error(exc) from exc
    return InferResult(served.name, served.version, selected)
