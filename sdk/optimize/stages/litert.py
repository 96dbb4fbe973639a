"""The ``litert-<recipe>`` stage, with a PyTorch model and ``OptimizeConfig.litert_recipes``:
the model exported to TFLite (litert-torch, at batch 1, the batch a board runs; a Keras model's
or SavedModel's float TFLite is made already, :mod:`sdk.optimize.tf_source`) and quantized
with each listed ai-edge-quantizer recipe (:func:`sdk.quantize.quantize_tflite`). The
candidates run in LiteRT, the runtime a bundle of them names, and are measured and judged like
the ONNX ones. With no ``litert_recipes`` named, the recipes a float ``.tflite`` gets are tried
whenever ``torch_model`` is given and the board may run LiteRT (:mod:`sdk.optimize.runtimes`);
without the ``tflite-export`` extra they are listed as skipped with the command that installs it.
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

__all__ = ["LITERT_PREFIX", "TFLITE_RECIPES", "LiteRTStage", "TfliteRecipe"]

LITERT_PREFIX = "litert"

#: The recipes tried on a float .tflite, and on the PyTorch model's TFLite export, unless
#: ``litert_recipes`` names others: the ones whose models tflite-runtime 2.14 runs correctly
#: (:data:`sdk.optimize.stages.litert_tflite.RUNTIME_UNSAFE` says why not the others).
TFLITE_RECIPES = ("static_wi8_ai8", "weight_only_wi8_afp32")


@dataclass(frozen=True)
class TfliteRecipe(Recipe):
    """The TFLite export quantized with the ai-edge-quantizer recipe ``recipe``."""

    suffix: ClassVar[str] = ".tflite"
    recipe: str

    @property
    def name(self) -> str:
        return f"{LITERT_PREFIX}-{self.recipe}"

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        from sdk.artifact import read_artifact
        from sdk.quantize.litert import RECIPES, quantize_tflite

        cal = ctx.require_calibration()
        calibration = cal if RECIPES[self.recipe].calibrated else None
        source = ctx.fp32.details.get("tflite_source")
        if source is not None:  # a Keras model's or SavedModel's float TFLite, made already
            return quantize_tflite(read_artifact(source), calibration, path, recipe=self.recipe)
        if ctx.torch_model is None:  # plan() rules this out
            raise ConfigError("a LiteRT candidate needs torch_model to export to TFLite")
        import torch

        from sdk.export import export

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
            dynamic_batch=False,  # a board runs batch 1
        )
        return quantize_tflite(exported, calibration, path, recipe=self.recipe)


class LiteRTStage:
    name = LITERT_PREFIX

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        from sdk.optimize.runtimes import litert_export_missing

        recipes = ctx.config.litert_recipes
        named = bool(recipes)
        converted = "tflite_source" in ctx.fp32.details  # a Keras model's or SavedModel's
        # by default with the module (or a float TFLite) at hand, on a board that may run LiteRT
        if not named and (ctx.torch_model is not None or converted) and "litert" in ctx.runtimes:
            recipes = TFLITE_RECIPES
        if not recipes or ctx.calibration is None:
            return []
        names = [f"{LITERT_PREFIX}-{r}" for r in recipes]
        reason = None
        if "litert" not in ctx.runtimes:
            reason = f"target {ctx.target.name} has no LiteRT runtime"
        elif converted:
            reason = None
        elif ctx.torch_model is None:
            reason = "LiteRT candidates are exported from the PyTorch model: pass torch_model"
        else:
            reason = litert_export_missing()
        if reason is not None:
            return [SkippedRecipe(n, reason) for n in names]
        return [TfliteRecipe(r) for r in recipes]
