"""Open Inference Protocol v2 tensors <-> numpy, for the OIP translator (serving/oip.py).

OIP carries a tensor as (name, datatype, shape) plus its data, which arrives in one of three
forms: gRPC ``raw_input_contents`` (BYTES elements as 4-byte little-endian length + bytes),
gRPC typed ``contents``, or REST JSON ``data`` (or the binary-data extension, whose bytes are
laid out like the gRPC raw form). Every failure here is the caller's fault: INVALID_ARGUMENT.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from serving.errors import ServingError

__all__ = [
    "CONTENTS_FIELD",
    "DTYPES",
    "bytes_tensor",
    "decode_raw",
    "encode_raw",
    "from_json_data",
    "to_json_data",
]

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
# The typed-contents field of InferTensorContents for each datatype.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# numpy refuses shapes whose non-zero dimensions times the item size pass its index range
# (even with a zero dimension, so zero elements), and arrays of more than 32 dimensions
# (numpy 1.x). 2**59 leaves room for the widest item (8 bytes) under 2**63.
_MAX_DIMS = 32
_MAX_EXTENT = 2**59


def _element_count(name: str, shape: Sequence[int]) -> int:
    if len(shape) > _MAX_DIMS:
        raise ServingError(
            "invalid_argument",
            f"input {name!r}: shape has {len(shape)} dimensions; at most {_MAX_DIMS} are allowed",
        )
    count, extent = 1, 1
    for dim in shape:
        if dim < 0:
            raise ServingError(
                "invalid_argument", f"input {name!r}: shape {list(shape)} has a negative dimension"
            )
        count *= dim
        extent *= dim or 1
    if extent > _MAX_EXTENT:
        raise ServingError(
            "invalid_argument", f"input {name!r}: shape {list(shape)} is larger than any tensor"
        )
    return count


def _check_datatype(name: str, datatype: str) -> None:
    if datatype not in DTYPES:
        raise ServingError(
            "invalid_argument",
            f"input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DTYPES)}",
        )


def bytes_tensor(name: str, items: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
    """An object array of ``bytes`` with ``shape``, checked against the element count."""
    count = _element_count(name, shape)
    if len(items) != count:
        raise ServingError(
            "invalid_argument",
            f"input {name!r}: shape {list(shape)} needs {count} elements, got {len(items)}",
        )
    array = np.empty(count, dtype=np.object_)
    for i, item in enumerate(items):
        array[i] = item
    return array.reshape(tuple(shape))


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """Decode one raw tensor (gRPC raw_input_contents or a REST binary-data chunk)."""
    _check_datatype(name, datatype)
    count = _element_count(name, shape)
    if datatype != "BYTES":
        dtype = np.dtype(DTYPES[datatype])
        if len(raw) != count * dtype.itemsize:
            raise ServingError(
                "invalid_argument",
                f"input {name!r}: {len(raw)} raw bytes do not fit {datatype} shape {list(shape)} "
                f"({count * dtype.itemsize} bytes expected)",
            )
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(tuple(shape))
    items: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ServingError("invalid_argument", f"input {name!r}: truncated BYTES length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ServingError(
                "invalid_argument",
                f"input {name!r}: BYTES element of {length} bytes runs past the end of the data",
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return bytes_tensor(name, items, shape)


def encode_raw(datatype: str, array: np.ndarray) -> bytes:
    """Serialise an output tensor in the raw layout (BYTES: length-prefixed elements)."""
    if datatype != "BYTES":
        return np.ascontiguousarray(
            array, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")
        ).tobytes()
    chunks = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        chunks.append(struct.pack("<I", len(data)))
        chunks.append(data)
    return b"".join(chunks)


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for item in data:
            out.extend(_flatten(item))
        return out
    return [data]


def from_json_data(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    """Decode REST JSON ``data`` or gRPC typed ``contents`` values (nested or flat list) into
    numpy; BYTES elements stay str (JSON) or bytes (gRPC contents)."""
    _check_datatype(name, datatype)
    flat = _flatten(data)
    count = _element_count(name, shape)
    if len(flat) != count:
        raise ServingError(
            "invalid_argument",
            f"input {name!r}: shape {list(shape)} needs {count} elements, got {len(flat)}",
        )
    if datatype == "BYTES":
        if not all(isinstance(x, (str, bytes)) for x in flat):
            raise ServingError("invalid_argument", f"input {name!r}: BYTES data must be strings")
        return bytes_tensor(name, flat, shape)
    try:
        return np.asarray(flat, dtype=DTYPES[datatype]).reshape(tuple(shape))
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: 300 as INT8
        raise ServingError(
            "invalid_argument", f"input {name!r}: data is not {datatype}: {exc}"
        ) from exc


def to_json_data(datatype: str, array: np.ndarray) -> list[Any]:
    """Flatten an output tensor for REST JSON (row-major, as OIP specifies)."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in flat]
    return flat.tolist()
