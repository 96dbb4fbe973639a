"""The ``ort-dynamic-int8`` stage: ONNX Runtime dynamic int8 (int8 weights, activations
quantized at run time), scored one sample at a time, as a board runs it, since its activation
scales depend on the batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sdk.artifact import ModelArtifact
from sdk.optimize.report import SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext
from sdk.quantize import QuantizeConfig, quantize

__all__ = ["DYNAMIC", "DynamicRecipe", "DynamicStage"]

DYNAMIC = "ort-dynamic-int8"


@dataclass(frozen=True)
class DynamicRecipe(Recipe):
    one_by_one: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return DYNAMIC

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        return quantize(
            ctx.fp32,
            ctx.calibration,
            out=path,
            config=QuantizeConfig(mode="dynamic", reduce_range=ctx.reduce_range),
            calibration_cache=ctx.calibration_cache,
        )


class DynamicStage:
    name = "ort-dynamic"

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        if not ctx.config.try_dynamic or ctx.nothing_to_quantize or ctx.no_default_ops:
            return []
        return [DynamicRecipe()]
