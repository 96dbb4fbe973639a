"""The ``litert-<recipe>`` stage, with a PyTorch model and ``OptimizeConfig.litert_recipes``:
the model exported to TFLite (litert-torch, at batch 1, the batch a board runs) and quantized
with each listed ai-edge-quantizer recipe (:func:`sdk.quantize.quantize_tflite`). The
candidates run in LiteRT, the runtime a bundle of them names, and are measured and judged like
the ONNX ones. Off by default: it needs the ``tflite-export`` extra and minutes of conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from sdk.artifact import ModelArtifact
from sdk.data import take_samples
from sdk.errors import ConfigError
from sdk.optimize.report import SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext

__all__ = ["LITERT_PREFIX", "LiteRTStage", "TfliteRecipe"]

LITERT_PREFIX = "litert"


@dataclass(frozen=True)
class TfliteRecipe(Recipe):
    """The TFLite export quantized with the ai-edge-quantizer recipe ``recipe``."""

    suffix: ClassVar[str] = ".tflite"
    recipe: str

    @property
    def name(self) -> str:
        return f"{LITERT_PREFIX}-{self.recipe}"

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        import torch

        from sdk.export import export
        from sdk.quantize.litert import RECIPES, quantize_tflite

        cal = ctx.require_calibration()
        if ctx.torch_model is None:  # plan() rules this out
            raise ConfigError("a LiteRT candidate needs torch_model to export to TFLite")
        one = take_samples(cal.inputs, 0, 1)
        example = tuple(
            torch.from_numpy(np.ascontiguousarray(one[s.name])) for s in ctx.fp32.io.inputs
        )
        exported = export(
            ctx.torch_model,
            example,
            to="tflite",
            path=path.with_name(path.stem + ".fp32.tflite"),
            input_names=[s.name for s in ctx.fp32.io.inputs],
            output_names=[s.name for s in ctx.fp32.io.outputs],
        )
        calibration = cal if RECIPES[self.recipe].calibrated else None
        return quantize_tflite(exported, calibration, path, recipe=self.recipe)


class LiteRTStage:
    name = LITERT_PREFIX

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        recipes = ctx.config.litert_recipes
        if not recipes or ctx.calibration is None:
            return []
        if ctx.torch_model is None:
            reason = "LiteRT candidates are exported from the PyTorch model: pass torch_model"
            return [SkippedRecipe(f"{LITERT_PREFIX}-{r}", reason) for r in recipes]
        return [TfliteRecipe(r) for r in recipes]
