"""Reading, checking and upgrading ONNX files, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdk.errors import ModelFormatError

__all__ = ["MIN_QUANT_OPSET", "check_onnx_file", "load_onnx", "opset_of", "upgrade_opset"]

# ONNX Runtime's quantizer wants opset >= 10 for QDQ and >= 13 for per-channel QDQ.
MIN_QUANT_OPSET = 13


def load_onnx(path: Path, *, load_external_data: bool = True) -> Any:
    """Parse an ONNX file, turning protobuf/IO failures into :class:`ModelFormatError`."""
    import onnx

    if not path.is_file():
        raise ModelFormatError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise ModelFormatError(f"{path.name} is empty (0 bytes); the file is not an ONNX model")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # DecodeError, OSError for missing external data, ...
        raise ModelFormatError(
            f"{path.name} is not a readable ONNX model (corrupt or truncated?): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


def check_onnx_file(path: Path) -> Any:
    """Load and run ONNX's checker on ``path``; return the model proto."""
    import onnx

    model = load_onnx(path)
    try:
        onnx.checker.check_model(str(path) if path.stat().st_size > 2**30 else model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(f"{path.name} fails ONNX's model check: {first}") from exc
    return model


def opset_of(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def upgrade_opset(model: Any, target: int) -> Any:
    """Convert ``model`` to ``target`` opset with ONNX's version converter."""
    from onnx import version_converter

    current = opset_of(model)
    if current >= target:
        return model
    try:
        return version_converter.convert_version(model, target)
    except Exception as exc:
        raise ModelFormatError(
            f"cannot upgrade the model from opset {current} to {target}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
