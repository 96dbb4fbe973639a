"""The registry of optimize's stages: each kind of candidate, registered once, in the order the
search tries them (expected pay-off first; see :mod:`sdk.optimize.search`).

A new kind of candidate is a module with a :class:`~sdk.optimize.stages.base.Stage` (and its
:class:`~sdk.optimize.stages.base.Recipe`) and one line in :func:`default_registry`. A stage
plans only for the model formats in its ``formats`` attribute (``("onnx",)`` when it has none):
a float ``.tflite`` gets fp32 and the ``litert-tflite`` stage, which lists the ONNX recipes as
skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

from sdk.optimize.report import SkippedRecipe
from sdk.optimize.stages.accuracy_aware import AccuracyAwareStage
from sdk.optimize.stages.base import Recipe, SearchContext, Stage
from sdk.optimize.stages.distilled import DistilledStage
from sdk.optimize.stages.fp16 import Fp16Stage
from sdk.optimize.stages.fp32 import Fp32Stage, FusedFp32Stage
from sdk.optimize.stages.latency_aware import LatencyAwareStage
from sdk.optimize.stages.litert import LiteRTStage
from sdk.optimize.stages.litert_tflite import TfliteFileStage
from sdk.optimize.stages.ort_dynamic import DynamicStage
from sdk.optimize.stages.ort_static import (
    AllOpsStage,
    BiasCorrectionStage,
    CalibrationVariantsStage,
    StaticStage,
)
from sdk.optimize.stages.pruned import PrunedStage
from sdk.optimize.stages.weight4 import WeightInt4Stage

__all__ = ["Recipe", "SearchContext", "Stage", "StageRegistry", "default_registry"]


class StageRegistry:
    """Stages by name, in the order they are tried. A name registers once."""

    def __init__(self) -> None:
        self._stages: dict[str, Stage] = {}

    def register(self, stage: Stage) -> None:
        if stage.name in self._stages:
            raise ValueError(f"stage {stage.name!r} is already registered")
        self._stages[stage.name] = stage

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages.values())

    def __getitem__(self, name: str) -> Stage:
        return self._stages[name]

    def names(self) -> list[str]:
        return list(self._stages)

    def plan(self, ctx: SearchContext) -> tuple[list[Recipe], list[SkippedRecipe]]:
        """Every stage's recipes for ``ctx``, in order, and the ones skipped at once. The
        baseline (fp32) comes first: every drop is measured from it."""
        recipes: list[Recipe] = []
        skipped: list[SkippedRecipe] = []
        for stage in self:
            if ctx.fp32.format not in getattr(stage, "formats", ("onnx",)):
                continue
            for item in stage.plan(ctx):
                if isinstance(item, SkippedRecipe):
                    skipped.append(item)
                else:
                    recipes.append(item)
        if not recipes or not recipes[0].baseline:
            raise ValueError("the first registered stage must plan the baseline recipe (fp32)")
        return recipes, skipped


def default_registry() -> StageRegistry:
    """fp32, fp32 with exact rewrites (when there is something to rewrite), ORT static int8,
    ORT dynamic int8, static over every operator type, the same with bias correction (only
    when it misses the drop line alone), latency-aware static int8 (the nodes measured slower
    in int8 kept in float; only while plain static int8 is not faster than fp32), int4 MatMul
    weights (with a size line), calibration variants, accuracy-aware int8, pruned, distilled,
    fp16, LiteRT (with ``litert_recipes``), and for a float .tflite the LiteRT recipes of the
    model as given."""
    registry = StageRegistry()
    for stage in (
        Fp32Stage(),
        FusedFp32Stage(),
        StaticStage(),
        DynamicStage(),
        AllOpsStage(),
        BiasCorrectionStage(),
        LatencyAwareStage(),
        WeightInt4Stage(),
        CalibrationVariantsStage(),
        AccuracyAwareStage(),
        PrunedStage(),
        DistilledStage(),
        Fp16Stage(),
        LiteRTStage(),
        TfliteFileStage(),
    ):
        registry.register(stage)
    return registry
