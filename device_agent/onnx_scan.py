"""Which tensors of an ONNX model keep their data in external files, read from the model's bytes.

An ONNX tensor may hold ``data_location: EXTERNAL`` and a ``location`` naming a file that ONNX
Runtime opens by itself: next to the model file when the model is loaded from a path, and in
the *current directory* when it is loaded from bytes (an encrypted model). Such a file is
outside the bundle's verification, so the agent refuses a model that refers to one (bundles
hold self-contained models: ``sdk.package`` inlines external data). This module finds those
references with a small reader of the protobuf wire format, so the agent needs neither
``onnx`` nor ``protobuf`` and the answer does not depend on the ONNX Runtime version.

Only the messages that can hold a tensor are descended into (field numbers from
``onnx/onnx.proto``): the model's graph, functions and training graphs; a graph's nodes,
initializers and sparse initializers; a node's attributes; an attribute's tensors, sparse
tensors and subgraphs (``If``, ``Loop``, ``Scan`` bodies). Everything else, raw tensor data
included, is skipped by its length without being copied.
"""

from __future__ import annotations

from dataclasses import dataclass

from device_agent.errors import BundleError

__all__ = ["ExternalRef", "external_data_refs"]

_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# Protobuf's own parser stops at 100 nested messages; a model cannot be deeper.
_MAX_DEPTH = 100

# message kind -> {field number: the kind of the embedded message}
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "function": {7: "node", 11: "attribute"},
    "tensor": {},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


@dataclass(frozen=True)
class ExternalRef:
    """A tensor whose data lives outside the model: its name and the ``location`` it gives."""

    tensor: str
    location: str


class _Malformed(Exception):
    pass


def external_data_refs(content: bytes, *, name: str = "model") -> list[ExternalRef]:
    """Every tensor in the ONNX model ``content`` that refers to external data.

    Raises :class:`BundleError` naming ``name`` when ``content`` is not a well-formed protobuf
    message (a truncated or garbled file), which ONNX Runtime would refuse as well.
    """
    view = memoryview(content)
    found: list[ExternalRef] = []
    stack: list[tuple[str, int, int, int]] = [("model", 0, len(view), 1)]
    try:
        while stack:
            kind, start, end, depth = stack.pop()
            if depth > _MAX_DEPTH:
                raise _Malformed(f"messages nested more than {_MAX_DEPTH} deep")
            ref = _scan(view, kind, start, end, depth, stack)
            if ref is not None:
                found.append(ref)
    except _Malformed as exc:
        raise BundleError(f"{name} is not a valid ONNX model ({exc})") from None
    return found


def _scan(
    view: memoryview,
    kind: str,
    pos: int,
    end: int,
    depth: int,
    stack: list[tuple[str, int, int, int]],
) -> ExternalRef | None:
    """Read one message in ``view[pos:end]``: push its embedded messages of interest on
    ``stack``; for a tensor, return its external reference if it has one."""
    children = _CHILDREN[kind]
    tensor = kind == "tensor"
    external = False
    tensor_name = ""
    location: str | None = None
    while pos < end:
        key, pos = _varint(view, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Malformed("a field numbered 0")
        if wire == 0:
            value, pos = _varint(view, pos, end)
            if tensor and field == _TENSOR_DATA_LOCATION and value == _EXTERNAL:
                external = True
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(view, pos, end)
            if length > end - pos:
                raise _Malformed("a field runs past the end of its message")
            child = children.get(field)
            if child is not None:
                stack.append((child, pos, pos + length, depth + 1))
            elif tensor and field == _TENSOR_NAME:
                tensor_name = bytes(view[pos : pos + length]).decode("utf-8", "replace")
            elif tensor and field == _TENSOR_EXTERNAL_DATA:
                external = True
                key_text, value_text = _entry(view, pos, pos + length)
                if key_text == "location":
                    location = value_text
            pos += length
        else:  # 3 and 4 (groups) are not used by ONNX; 6 and 7 do not exist
            raise _Malformed(f"wire type {wire} in field {field}")
        if pos > end:
            raise _Malformed("a field runs past the end of its message")
    if tensor and external:
        return ExternalRef(tensor=tensor_name, location=location or "")
    return None


def _entry(view: memoryview, pos: int, end: int) -> tuple[str, str]:
    """``(key, value)`` of a StringStringEntryProto."""
    texts = {_ENTRY_KEY: "", _ENTRY_VALUE: ""}
    while pos < end:
        key, pos = _varint(view, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = _varint(view, pos, end)
            if length > end - pos:
                raise _Malformed("a field runs past the end of its message")
            if field in texts:
                texts[field] = bytes(view[pos : pos + length]).decode("utf-8", "replace")
            pos += length
        elif wire == 0:
            _, pos = _varint(view, pos, end)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise _Malformed(f"wire type {wire} in field {field}")
    if pos > end:
        raise _Malformed("a field runs past the end of its message")
    return texts[_ENTRY_KEY], texts[_ENTRY_VALUE]


def _varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("a truncated or overlong varint")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
