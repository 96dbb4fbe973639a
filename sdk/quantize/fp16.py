"""fp16: half-precision weights and arithmetic, with fp32 inputs and outputs so the model's
interface (and every caller's data) stays the same.

ONNX Runtime's fp16 converter does the work; this module makes its output a valid graph (the
converter appends the input casts after the nodes that read them) and turns its failures into
an edgeship error. Whether fp16 pays off depends on the runtime: ONNX Runtime's CPU execution
provider has fp16 kernels for few operators, which is why optimize only tries it on request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdk.artifact import ModelArtifact, read_artifact
from sdk.errors import QuantizationError

__all__ = ["FP16_RECIPE", "to_fp16"]

FP16_RECIPE = "fp16"


def to_fp16(fp32: ModelArtifact, out: str | Path) -> ModelArtifact:
    """fp16 weights and arithmetic with fp32 inputs and outputs (the same I/O as fp32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        converted = convert_float_to_float16(onnx.load(str(fp32.path)), keep_io_types=True)
        _sort_nodes(converted.graph)  # the converter appends the input casts at the end
        onnx.save(converted, str(out))
    except Exception as exc:  # the converter raises anything on graphs it does not handle
        raise QuantizationError(f"fp16 conversion: {exc}") from exc
    return read_artifact(out, precision="fp16", recipe=FP16_RECIPE)


def _sort_nodes(graph: Any) -> None:
    """Put ``graph``'s nodes in topological order (stable otherwise)."""
    import onnx

    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        pending.append(copy)
    ordered: list[Any] = []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:  # a cycle or a dangling input: leave the rest for the checker to name
            ordered.extend(pending)
            break
        for n in ready:
            known.update(n.output)
        ordered.extend(ready)
        taken = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in taken]
    del graph.node[:]
    graph.node.extend(ordered)
