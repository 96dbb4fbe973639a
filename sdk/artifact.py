"""Model artifacts: a model file plus what a later stage needs to know about it.

Pipeline stages (export, quantize, benchmark, package) hand each other artifacts, never live
``nn.Module`` objects, so any stage can run alone, from the CLI or inside a search.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from device_agent.contracts.bundle import IOSpec
from device_agent.errors import RuntimeLoadError
from sdk.errors import ModelFormatError

__all__ = ["ModelArtifact", "ModelFormat", "format_for_path", "read_artifact"]

ModelFormat = Literal["onnx", "tflite", "torchscript"]

_SUFFIXES: dict[str, ModelFormat] = {".onnx": "onnx", ".tflite": "tflite", ".pt": "torchscript"}


@dataclass(frozen=True)
class ModelArtifact:
    """A model file on disk with its format, I/O spec and provenance.

    ``precision`` is ``"fp32"``, ``"int8"``, ...; ``recipe`` names how it was made (for example
    ``"ort-static-int8"``); ``details`` holds stage-specific facts such as the export's maximum
    difference from PyTorch.
    """

    path: Path
    format: ModelFormat
    io: IOSpec
    precision: str = "fp32"
    recipe: str = "fp32"
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def runtime(self) -> str:
        if self.format == "onnx":
            return "onnxruntime"
        if self.format == "tflite":
            return "litert"
        return "torchscript"

    def with_details(self, **extra: Any) -> ModelArtifact:
        return replace(self, details={**self.details, **extra})


def format_for_path(path: Path) -> ModelFormat:
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ModelFormatError(
            f"{path.name}: unknown model format {path.suffix!r}; expected one of "
            f"{sorted(_SUFFIXES)}"
        )
    return fmt


def read_artifact(
    path: str | Path, *, precision: str = "fp32", recipe: str = "given"
) -> ModelArtifact:
    """Describe an existing ``.onnx`` or ``.tflite`` file, checking that its runtime can load it.

    A scikit-learn model with a ZipMap output (skl2onnx's default) is described as its
    rewritten copy, whose outputs are tensors (:mod:`sdk.onnx_ml`): the artifact's ``path`` is
    that copy, ``details["converted_from"]`` the file given, ``details["notes"]`` one line per
    change and ``details["class_labels"]`` the probability columns' classes.
    """
    from device_agent.runtime import open_session

    model = Path(path)
    if not model.exists():
        raise ModelFormatError(f"model file not found: {model}")
    if not model.is_file():
        raise ModelFormatError(f"{model} is a directory, not a model file")
    fmt = format_for_path(model)
    if fmt == "torchscript":
        raise ModelFormatError(
            f"{model.name}: TorchScript files cannot be benchmarked or bundled; "
            "export the model to ONNX or TFLite"
        )
    details: dict[str, Any] = {}
    if fmt == "onnx":
        from sdk.onnx_ml import tensor_outputs
        from sdk.onnx_tools import check_onnx_file

        converted = tensor_outputs(model, check_onnx_file(model))
        if converted is not None:
            details = converted[1].details(model)
            model = converted[0]
    try:
        session = open_session(model, threads=1)
    except RuntimeLoadError as exc:
        raise ModelFormatError(str(exc)) from exc
    return ModelArtifact(
        path=model, format=fmt, io=session.io, precision=precision, recipe=recipe, details=details
    )
