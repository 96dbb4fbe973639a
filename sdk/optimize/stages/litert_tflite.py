"""The ``litert-<recipe>`` stage for a float ``.tflite`` model: the model as given quantized
with each ai-edge-quantizer recipe (:func:`sdk.quantize.quantize_tflite`), the candidates run
in LiteRT and measured and judged like the ONNX ones.

The recipes are :attr:`~sdk.optimize.OptimizeConfig.litert_recipes` when set, else
:data:`TFLITE_RECIPES`: static int8 (calibrated on the calibration data; skipped with the
reason when there is none) and weight-only int8, and with a size line in the budget
:data:`SIZE_RECIPES` (int4 weights). The recipes in :data:`RUNTIME_UNSAFE` are listed as
skipped unless ``litert_recipes`` names them: tflite-runtime 2.14 computes wrong outputs with
the dynamic-range ones and refuses to load int4 weights. The
ONNX Runtime recipes the search would try on an ONNX model are listed as skipped: the model is
a ``.tflite``.

Without eval data or a ``drop`` line the search gates int8 candidates on the quantizer's check
against the float model (``min_cosine``); a candidate of another precision (int4, int16
activations) gets the same gate here (:func:`~sdk.optimize.stages.weight4.precision_gate`), so
none is chosen unchecked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sdk.artifact import ModelArtifact
from sdk.errors import QuantizationError
from sdk.optimize.report import SkippedRecipe
from sdk.optimize.stages.accuracy_aware import ACCURACY_AWARE
from sdk.optimize.stages.base import Recipe, SearchContext
from sdk.optimize.stages.distilled import DISTILLED
from sdk.optimize.stages.fp16 import FP16
from sdk.optimize.stages.litert import LITERT_PREFIX, TFLITE_RECIPES, TfliteRecipe
from sdk.optimize.stages.ort_dynamic import DYNAMIC
from sdk.optimize.stages.ort_static import STATIC_PREFIX
from sdk.optimize.stages.weight4 import WEIGHT_INT4, precision_gate

__all__ = [
    "LITERT_ONLY_REASON",
    "ONNX_ONLY_REASON",
    "RUNTIME_UNSAFE",
    "SIZE_RECIPES",
    "TFLITE_RECIPES",
    "TfliteFileRecipe",
    "TfliteFileStage",
]


#: Recipes left out unless ``litert_recipes`` names them, and why: tflite-runtime 2.14 (the
#: LiteRT many Raspberry Pi images have) loads ai-edge-quantizer's dynamic-range models and
#: computes wrong outputs with them (the digits CNN: every digit predicted as '1', where
#: ai-edge-litert agrees with the float model), with no error to catch.
#: ``weight_only_wi4_afp32``: tflite-runtime 2.14 refuses its models when the interpreter
#: prepares them (its DEQUANTIZE kernel takes no int4 input), where ai-edge-litert 2.4.6 runs
#: them (the digits CNN: 98.0% top-1 on the 450 test digits, the float model 98.2%).
RUNTIME_UNSAFE = {
    "dynamic_wi8_afp32": "tflite-runtime 2.14 (many Pi images) runs its models without an "
    "error but computes wrong outputs; name it in litert_recipes to try it for ai-edge-litert",
    "dynamic_wi4_afp32": "tflite-runtime 2.14 (many Pi images) runs its models without an "
    "error but computes wrong outputs; name it in litert_recipes to try it for ai-edge-litert",
    "weight_only_wi4_afp32": "tflite-runtime 2.14 (many Pi images) cannot load its models "
    "(its DEQUANTIZE kernel takes no int4 weights); name it in litert_recipes to try it for "
    "ai-edge-litert",
}

#: Recipes added to the defaults when the budget has a size line: int4 weights, a sixth of
#: the float model's size (or listed as skipped while in :data:`RUNTIME_UNSAFE`).
SIZE_RECIPES = ("weight_only_wi4_afp32",)

ONNX_ONLY_REASON = "the model is a .tflite: ONNX Runtime recipes need an ONNX model"
#: The same, when the search exported the PyTorch model to TFLite for a LiteRT-only board.
LITERT_ONLY_REASON = "the bundle may name LiteRT only (runtime, target): no ONNX Runtime recipe"


@dataclass(frozen=True)
class TfliteFileRecipe(TfliteRecipe):
    """The float .tflite quantized with the ai-edge-quantizer recipe ``recipe`` (named as the
    PyTorch path's LiteRT candidates are; made from the model as given, not an export)."""

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        from sdk.quantize.litert import quantize_tflite

        art = quantize_tflite(ctx.fp32, ctx.calibration, path, recipe=self.recipe)
        reason = precision_gate(ctx, art)
        if reason is not None:
            raise QuantizationError(reason)
        return art


@dataclass(frozen=True)
class DynamicTfliteFileRecipe(TfliteFileRecipe):
    """A dynamic-range recipe: its ops scale activations per run, so it is scored one sample
    at a time, as a board runs it."""

    one_by_one: ClassVar[bool] = True


def _recipe(name: str) -> TfliteFileRecipe:
    if name.startswith("dynamic_"):
        return DynamicTfliteFileRecipe(name)
    return TfliteFileRecipe(name)


class TfliteFileStage:
    name = "litert-tflite"
    formats: ClassVar[tuple[str, ...]] = ("tflite",)

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        from sdk.quantize.litert import RECIPES

        named = ctx.config.litert_recipes
        plan: list[Recipe | SkippedRecipe] = []
        for recipe in named or _default_recipes(ctx):
            if not named and recipe in RUNTIME_UNSAFE:
                plan.append(SkippedRecipe(f"{LITERT_PREFIX}-{recipe}", RUNTIME_UNSAFE[recipe]))
            elif RECIPES[recipe].calibrated and ctx.calibration is None:
                reason = "no calibration data: this recipe calibrates activation ranges"
                plan.append(SkippedRecipe(f"{LITERT_PREFIX}-{recipe}", reason))
            else:
                plan.append(_recipe(recipe))
        why = LITERT_ONLY_REASON if ctx.fp32.details.get("litert_only") else ONNX_ONLY_REASON
        plan += [SkippedRecipe(name, why) for name in _onnx_recipes(ctx)]
        return plan


def _default_recipes(ctx: SearchContext) -> list[str]:
    """:data:`TFLITE_RECIPES`, with a size line :data:`SIZE_RECIPES`, and the other recipes
    of :data:`RUNTIME_UNSAFE` (listed as skipped)."""
    sized = ctx.config.budget.max_size_mb is not None
    names = [*TFLITE_RECIPES, *(SIZE_RECIPES if sized else ())]
    return names + [r for r in RUNTIME_UNSAFE if r not in names and r not in SIZE_RECIPES]


def _onnx_recipes(ctx: SearchContext) -> list[str]:
    """The first ONNX Runtime recipes the search would try on an ONNX model with these data."""
    cfg = ctx.config
    names = []
    if ctx.calibration is not None and cfg.static_methods:
        names.append(f"{STATIC_PREFIX}-{cfg.static_methods[0]}")
        if ctx.eval_data is not None and cfg.budget.max_accuracy_drop is not None:
            names.append(ACCURACY_AWARE)
    if cfg.try_dynamic:
        names.append(DYNAMIC)
    if cfg.budget.max_size_mb is not None:
        names.append(WEIGHT_INT4)
    names.append(FP16)
    if ctx.torch_model is not None and ctx.train_data is not None:
        names += [f"pruned-{r * 100:g}-int8" for r in cfg.prune_ratios]
        if ctx.student is not None:
            names.append(DISTILLED)
    return names
