"""An ONNX graph's signature (inputs, outputs, their dtypes and shapes) and its external-data files, read
straight from the protobuf wire format.

Serving installs neither `onnx` nor torch, and opening an ONNX Runtime session only to list a UNet's
inputs would load gigabytes of weights twice. The few messages needed are walked field by field over a
memory map; weights stored inside the graph file are skipped by their length, never read.

    ModelProto.graph (7) → GraphProto.initializer (5) / input (11) / output (12)
    ValueInfoProto.name (1), .type (2) → TypeProto.tensor_type (1) → elem_type (1), shape (2)
    TensorShapeProto.dim (1) → dim_value (1) | dim_param (2)
    TensorProto.external_data (13) → StringStringEntryProto key (1) = "location", value (2)
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from engines import manifest as mf
from engines.errors import ModelInvalid

# TensorProto.DataType → numpy dtype name
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
          10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class Signature:
    """What `read` finds in one graph file."""

    def __init__(self, inputs: list[mf.TensorSpec], outputs: list[mf.TensorSpec], external: list[str]) -> None:
        self.inputs, self.outputs, self.external = inputs, outputs, external


def read(path: Path) -> Signature:
    """The graph's inputs (initializers excluded) and outputs, and the external-data files it names."""
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            view = memoryview(data)
            try:
                return _model(view)
            finally:
                view.release()
    except (ValueError, IndexError, KeyError) as exc:
        raise ModelInvalid(f"{path}: not a readable ONNX graph ({exc})") from exc


def _model(view: memoryview) -> Signature:
    graphs = [value for number, value in _fields(view) if number == 7]
    if not graphs:
        raise ValueError("no graph in the model")
    inputs, outputs, initializers, external = [], [], set(), set()
    for number, value in _fields(graphs[-1]):
        if number == 11:
            inputs.append(_value_info(value))
        elif number == 12:
            outputs.append(_value_info(value))
        elif number == 5:
            name, location = _initializer(value)
            initializers.add(name)
            if location:
                external.add(location)
    # Old exporters list initializers among the inputs as well; they are weights, not inputs.
    inputs = [spec for spec in inputs if spec.name not in initializers]
    return Signature(inputs, outputs, sorted(external))


def _value_info(view: memoryview) -> mf.TensorSpec:
    name, elem_type, shape = "", 0, []
    for number, value in _fields(view):
        if number == 1:
            name = bytes(value).decode()
        elif number == 2:
            for tensor_field, tensor in _fields(value):
                if tensor_field == 1:  # tensor_type
                    elem_type, shape = _tensor_type(tensor)
    if elem_type not in DTYPES:
        raise ValueError(f"{name}: not a tensor of a known element type ({elem_type})")
    return mf.TensorSpec(name, DTYPES[elem_type], shape)


def _tensor_type(view: memoryview) -> tuple[int, list[int | str]]:
    elem_type, shape = 0, []
    for number, value in _fields(view):
        if number == 1:
            elem_type = value
        elif number == 2:
            shape = [_dim(dim) for dim_field, dim in _fields(value) if dim_field == 1]
    return elem_type, shape


def _dim(view: memoryview) -> int | str:
    for number, value in _fields(view):
        if number == 1:
            return value
        if number == 2:
            return bytes(value).decode()
    return "?"  # neither set: an unnamed dynamic axis


def _initializer(view: memoryview) -> tuple[str, str | None]:
    name, location = "", None
    for number, value in _fields(view):
        if number == 8:
            name = bytes(value).decode()
        elif number == 13:
            entry = dict(_fields(value))
            if bytes(entry.get(1, b"")) == b"location":
                location = bytes(entry[2]).decode()
    return name, location


def _fields(view: memoryview) -> Iterator[tuple[int, object]]:
    """(field number, value) pairs of one message: ints for varints, memoryviews for the rest."""
    at = 0
    while at < len(view):
        key, at = _varint(view, at)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, at = _varint(view, at)
        elif wire == LENGTH:
            size, at = _varint(view, at)
            if at + size > len(view):
                raise ValueError("truncated message")
            value, at = view[at : at + size], at + size
        elif wire in (FIXED64, FIXED32):
            width = 8 if wire == FIXED64 else 4
            value, at = view[at : at + width], at + width
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, value


def _varint(view: memoryview, at: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = view[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, at
        shift += 7
