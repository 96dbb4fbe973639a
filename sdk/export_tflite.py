"""TFLite export through litert-torch, and what it takes to make its file take the same feed as the
ONNX export: the signature's inputs and outputs renamed to the given names, and the output batch
set when litert-torch had to fix it (see :mod:`sdk.export`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_agent.contracts.bundle import IOSpec
from sdk.errors import ExportError
from sdk.export_common import at_least_two, one_line

if TYPE_CHECKING:
    import torch

__all__ = ["export_tflite", "set_tflite_output_batch"]

# The export stage's logger: the TFLite path logs where the rest of the export does.
log = logging.getLogger("sdk.export")

_LITERT_PROGRESS = "LITERT_TORCH_SHOW_PROGRESS"


def export_tflite(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    out: Path,
    in_names: list[str],
    out_names: list[str],
    dynamic_batch: bool,
) -> bool:
    """Convert with litert-torch and name the signature's tensors; return whether the batch
    dimension stayed dynamic."""
    import torch

    try:
        import litert_torch
    except ImportError as exc:
        raise ExportError(
            "TFLite export needs litert-torch; install it with: "
            "pip install 'edgeship[tflite-export]'"
        ) from exc

    converted = None
    dynamic = False
    with _quiet_litert():
        if dynamic_batch:
            batch = torch.export.Dim("batch")
            shapes = tuple({0: batch} if t.dim() else {} for t in inputs)
            try:
                converted = litert_torch.convert(model, at_least_two(inputs), dynamic_shapes=shapes)
                dynamic = True
            except Exception as exc:
                # litert-torch cannot lower a symbolic batch through some ops (flatten/reshape
                # in 0.10), so such models get the example's fixed batch size instead.
                log.warning(
                    "TFLite export with a dynamic batch failed (%s); exporting with the fixed "
                    "batch size %d of the example inputs",
                    one_line(exc),
                    inputs[0].shape[0] if inputs[0].dim() else 1,
                )
        try:
            if converted is None:
                converted = litert_torch.convert(model, inputs)
            converted.export(str(out))
        except Exception as exc:
            raise ExportError(
                f"TFLite export of {type(model).__name__} failed: {one_line(exc)}"
            ) from exc
    _rename_tflite_signature(out, in_names, out_names)
    return dynamic


@contextlib.contextmanager
def _quiet_litert() -> Iterator[None]:
    """litert-torch prints a progress tree to the terminal unless told not to."""
    old = os.environ.get(_LITERT_PROGRESS)
    os.environ[_LITERT_PROGRESS] = "y" if log.isEnabledFor(logging.DEBUG) else "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_LITERT_PROGRESS, None)
        else:
            os.environ[_LITERT_PROGRESS] = old


def _rename_tflite_signature(path: Path, in_names: list[str], out_names: list[str]) -> None:
    """Give the signature's inputs and outputs, and their tensors, the caller's names.

    litert-torch names positional inputs ``args_0, args_1, ...`` and outputs ``output_0, ...``
    (tensors ``serving_default_args_0`` and ``serving_default_output_0_output``); after this the
    signature and the tensors are both called ``image``/``logits``/..., so every runtime and the
    quantizer see the same names as the ONNX export.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    sigs = model.signatureDefs or []
    if len(sigs) != 1:
        raise ExportError(f"the TFLite export has {len(sigs)} signatures; expected exactly one")
    sig = sigs[0]
    subgraph = model.subgraphs[sig.subgraphIndex]
    for kind, entries, names in (
        ("args", sig.inputs, in_names),
        ("output", sig.outputs, out_names),
    ):
        wanted = {f"{kind}_{i}": name for i, name in enumerate(names)}
        found = sorted(_text(e.name) for e in entries)
        if found != sorted(wanted):
            raise ExportError(
                f"the TFLite export's signature names {found} are not the expected {sorted(wanted)}"
            )
        for entry in entries:
            name = wanted[_text(entry.name)]
            entry.name = name.encode()
            subgraph.tensors[entry.tensorIndex].name = name.encode()
    flatbuffer_utils.write_model(model, str(path))


def set_tflite_output_batch(path: Path, io: IOSpec) -> None:
    """Record the dynamic batch axis in the file's output shape signatures too.

    litert-torch writes outputs with the traced example's fixed shape, so a later reader
    (``read_artifact``, the agent) would otherwise see a fixed batch on the outputs.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    batched = {o.name for o in io.outputs if o.shape and o.shape[0] == "batch"}
    if not batched:
        return
    model = flatbuffer_utils.read_model(str(path))
    sig = model.signatureDefs[0]
    subgraph = model.subgraphs[sig.subgraphIndex]
    for entry in sig.outputs:
        if _text(entry.name) in batched:
            tensor = subgraph.tensors[entry.tensorIndex]
            dims = [
                int(d)
                for d in (
                    tensor.shapeSignature
                    if tensor.shapeSignature is not None and len(tensor.shapeSignature)
                    else tensor.shape
                )
            ]
            dims[0] = -1
            tensor.shapeSignature = np.array(dims, dtype=np.int32)
    flatbuffer_utils.write_model(model, str(path))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
