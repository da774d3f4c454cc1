"""Triton's model-configuration extension: a ``ModelConfig`` derived from a served model.

Nothing here is configured by hand: the inputs and outputs are the model's OIP metadata
(its codec's ``oip_inputs`` / ``oip_outputs``), each datatype as Triton's ``TYPE_*`` name
(``BYTES`` is ``TYPE_STRING``), dims as in the metadata (-1: variable). The JSON form is the
one Triton's REST API answers: model_config.proto's field names, integers as JSON numbers.

``max_batch_size`` is 0 for every model: a request's leading dimension is its item count,
but no model here promises Triton's batching contract (dims without the batch dimension, a
scheduler that merges requests), so a client sends full shapes, as for any Triton model
with ``max_batch_size: 0``. ERNIE's own dynamic batcher is internal to its adapter.
"""

from __future__ import annotations

from typing import Any

from serving.model_host import ServedModel

__all__ = ["BACKEND", "model_config", "platform", "triton_data_type"]

#: the engines' names as the OIP metadata ``platform`` (and the config's) gives them
_PLATFORMS = {"paddle": "paddle_inference", "openvino": "openvino"}
#: the config's ``backend``: what runs the model
BACKEND = "paddle-meter"

_DATA_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BF16": "TYPE_BF16",
    "BYTES": "TYPE_STRING",
}


def platform(served: ServedModel) -> str:
    """The OIP metadata / config ``platform`` of a served model: the engine that runs it
    ("openvino", "paddle_inference"; stages on different engines joined with "+")."""
    engines = served.adapter.runtime_description() or "paddle"
    names = [part.partition("=")[2] or part for part in engines.split(",")]
    return "+".join(dict.fromkeys(_PLATFORMS.get(name, name) for name in names))


def triton_data_type(datatype: str) -> str:
    """Triton's ``DataType`` enum name of an OIP datatype (``BYTES`` -> ``TYPE_STRING``)."""
    return _DATA_TYPES.get(datatype, "TYPE_INVALID")


def _version_policy(version: str) -> dict[str, Any]:
    # Triton versions are integers; a non-numeric version option is "the one there is".
    if version.isascii() and version.isdigit():
        return {"specific": {"versions": [int(version)]}}
    return {"latest": {"num_versions": 1}}


def model_config(served: ServedModel) -> dict[str, Any]:
    """The ``ModelConfig`` of ``served`` as Triton's REST ``/config`` answers it."""
    inputs = [
        {
            "name": tensor["name"],
            "data_type": triton_data_type(tensor["datatype"]),
            "format": "FORMAT_NONE",
            "dims": [int(d) for d in tensor["shape"]],
            "is_shape_tensor": False,
            "allow_ragged_batch": False,
            "optional": False,
        }
        for tensor in served.codec.oip_inputs()
    ]
    outputs = [
        {
            "name": tensor["name"],
            "data_type": triton_data_type(tensor["datatype"]),
            "dims": [int(d) for d in tensor["shape"]],
            "label_filename": "",
            "is_shape_tensor": False,
        }
        for tensor in served.codec.oip_outputs()
    ]
    return {
        "name": served.name,
        "platform": platform(served),
        "backend": BACKEND,
        "version_policy": _version_policy(served.version),
        "max_batch_size": 0,
        "input": inputs,
        "output": outputs,
        "instance_group": [{"name": f"{served.name}_0", "kind": "KIND_CPU", "count": 1}],
        "parameters": {
            "paddle_meter.kind": {"string_value": served.kind},
            "paddle_meter.operation": {"string_value": served.operation},
        },
        "model_transaction_policy": {"decoupled": False},
    }
