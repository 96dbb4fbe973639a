"""Quantization, all of it: ONNX Runtime int8 (:mod:`sdk.quantize.ort`), accuracy-aware int8 that
keeps the most sensitive nodes in float (:mod:`sdk.quantize.accuracy_aware`), LiteRT int8
through ai-edge-quantizer (:mod:`sdk.quantize.litert`), int4 MatMul weights for ONNX Runtime
(:mod:`sdk.quantize.nbits`) and fp16 (:mod:`sdk.quantize.fp16`).

``from sdk.quantize import quantize`` is the ONNX Runtime stage, as it was when this package
was one module. The submodules load their heavy libraries (onnx, onnxruntime, ai-edge-quantizer)
inside the functions that need them.
"""

from __future__ import annotations

from sdk.quantize.accuracy_aware import (
    ExclusionStep,
    NodeSensitivity,
    SensitivityReport,
    accuracy_aware_quantize,
)
from sdk.quantize.config import (
    CHECK_MIN_COSINE,
    DEFAULT_OP_TYPES,
    CalibMethod,
    QuantizeConfig,
    QuantMode,
)
from sdk.quantize.fp16 import to_fp16
from sdk.quantize.litert import RECIPES, LiteRTRecipe, quantize_tflite
from sdk.quantize.nbits import quantize_int4
from sdk.quantize.ort import quantize
from sdk.quantize.ranking import TensorSensitivity, rank_tensors

__all__ = [
    "CHECK_MIN_COSINE",
    "DEFAULT_OP_TYPES",
    "RECIPES",
    "CalibMethod",
    "ExclusionStep",
    "LiteRTRecipe",
    "NodeSensitivity",
    "QuantMode",
    "QuantizeConfig",
    "SensitivityReport",
    "TensorSensitivity",
    "accuracy_aware_quantize",
    "quantize",
    "quantize_int4",
    "quantize_tflite",
    "rank_tensors",
    "to_fp16",
]
