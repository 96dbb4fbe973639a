"""The ``fp32`` stage: the model as given (ONNX or a float .tflite), always measured, the
baseline every drop is measured from; and ``fp32-fused``: the same ONNX model with the exact
rewrites of :mod:`sdk.quantize.fusions` (constant scales and shifts folded into Convs,
written-out hard-swishes made ``x * HardSigmoid(x)``), planned only when they find something
to rewrite. Its outputs equal fp32's up to float rounding, and it is often faster: PaddleOCR's
nets run at 0.6-0.85x fp32's p50 (docs/quantization.md)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdk.artifact import ModelArtifact
from sdk.optimize.report import SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext

if TYPE_CHECKING:
    from sdk.quantize.fusions import Fusions

__all__ = [
    "FLOAT_MODELS",
    "FP32",
    "FP32_FUSED",
    "Fp32Recipe",
    "Fp32Stage",
    "Fp32TfliteRecipe",
    "FusedFp32Recipe",
    "FusedFp32Stage",
]

FP32 = "fp32"
FP32_FUSED = "fp32-fused"
#: The lossless candidates a lossy one must beat, in the order the choice settles against them.
FLOAT_MODELS = (FP32_FUSED, FP32)


@dataclass(frozen=True)
class Fp32Recipe(Recipe):
    """The fp32 model copied into the candidates directory."""

    baseline: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return FP32

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        if ctx.fp32.format == "onnx":
            from sdk.package import inline_external_data

            # a model with external data files is read in whole: the copy holds its weights
            if inline_external_data(ctx.fp32.path, path) == ctx.fp32.path:
                shutil.copyfile(ctx.fp32.path, path)
        else:
            shutil.copyfile(ctx.fp32.path, path)
        return ModelArtifact(path=path, format=ctx.fp32.format, io=ctx.fp32.io, recipe=FP32)


@dataclass(frozen=True)
class Fp32TfliteRecipe(Fp32Recipe):
    """The float .tflite copied into the candidates directory."""

    suffix: ClassVar[str] = ".tflite"


class Fp32Stage:
    name = FP32
    formats: ClassVar[tuple[str, ...]] = ("onnx", "tflite")

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        return [Fp32TfliteRecipe() if ctx.fp32.format == "tflite" else Fp32Recipe()]


def _fused(source: Path) -> tuple[Any, Fusions] | None:
    """The rewritten model and what was rewritten; None when nothing was, or when the model
    keeps its weights in external files (its copy would lose them)."""
    import onnx

    from sdk.quantize.fusions import fuse

    model = onnx.load(str(source), load_external_data=False)
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        return None
    done = fuse(model)
    return (model, done) if done else None


@dataclass(frozen=True)
class FusedFp32Recipe(Recipe):
    """The fp32 ONNX model with the exact rewrites of :mod:`sdk.quantize.fusions`, rewritten
    once, when the stage plans it (``model``, ``done``). The rewritten copy is held until the
    search ends: one more copy of the weights in the search's process (candidates are timed in
    worker processes, so no benchmark's memory figure includes it), instead of a second
    rewrite."""

    model: Any = field(compare=False, repr=False)
    done: Fusions = field(compare=False)

    @property
    def name(self) -> str:
        return FP32_FUSED

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        import onnx

        model, done = self.model, self.done
        onnx.save(model, str(path))
        return ModelArtifact(
            path=path,
            format="onnx",
            io=ctx.fp32.io,
            recipe=FP32_FUSED,
            details={"fusions": done.describe()},
        )


class FusedFp32Stage:
    name = FP32_FUSED

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        fused = _fused(ctx.fp32.path) if ctx.config.try_fused_fp32 else None
        if fused is None:
            return []
        return [FusedFp32Recipe(*fused)]
