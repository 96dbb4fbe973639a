"""The ``fp32`` stage: the model as given (ONNX or a float .tflite), always measured, the
baseline every drop is measured from."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sdk.artifact import ModelArtifact
from sdk.optimize.report import SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext

__all__ = ["FP32", "Fp32Recipe", "Fp32Stage", "Fp32TfliteRecipe"]

FP32 = "fp32"


@dataclass(frozen=True)
class Fp32Recipe(Recipe):
    """The fp32 model copied into the candidates directory."""

    baseline: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return FP32

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
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
