"""The ``ort-weight-int4`` stage: the ONNX model's MatMul weights in 4-bit blocks, run by ONNX
Runtime's ``MatMulNBits`` (:func:`sdk.quantize.nbits.quantize_int4`; Gemm with a constant
weight is rewritten to MatMul first, so MLPs exported from ``nn.Linear`` count).

Planned only when the budget has a size line (``size<=``): int4 weights are about a sixth of
fp32's and two thirds smaller than int8's, which matters when the file must fit, while
activations stay float (no calibration, and not faster than int8 on every board). Without a
size line nothing is planned; with one but no MatMul or Gemm with a constant weight (a CNN), the
candidate is listed as skipped with that reason. The candidate is measured and chosen by the
search's rules like any other: it wins only by the objective.

Without eval data or a ``drop`` line the search gates int8 candidates on the quantizer's check
against fp32 (``min_cosine``); this stage applies the same gate to its int4 model
(:func:`precision_gate`, which the float .tflite's LiteRT stage applies to its int4 and int16
candidates too), so it is never chosen unchecked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdk.artifact import ModelArtifact
from sdk.errors import QuantizationError
from sdk.optimize.report import SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext
from sdk.quantize.nbits import INT4_RECIPE

__all__ = ["WEIGHT_INT4", "WeightInt4Recipe", "WeightInt4Stage", "precision_gate"]

WEIGHT_INT4 = INT4_RECIPE


@dataclass(frozen=True)
class WeightInt4Recipe(Recipe):
    @property
    def name(self) -> str:
        return WEIGHT_INT4

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        from sdk.quantize.nbits import quantize_int4

        art = quantize_int4(ctx.fp32, ctx.calibration, out=path)
        reason = precision_gate(ctx, art)
        if reason is not None:
            raise QuantizationError(reason)
        return art


class WeightInt4Stage:
    name = WEIGHT_INT4

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        if ctx.config.budget.max_size_mb is None or not ctx.config.try_weight_int4:
            return []
        from sdk.quantize.nbits import int4_blocker

        reason = int4_blocker(ctx.fp32.path)
        if reason is not None:
            return [SkippedRecipe(WEIGHT_INT4, reason)]
        return [WeightInt4Recipe()]


def precision_gate(ctx: SearchContext, art: ModelArtifact) -> str | None:
    """The search's check gate (``min_cosine`` on the quantizer's check against the float
    model, when there is no eval data with a ``drop`` line) for the precisions the search does
    not gate itself (not int8): the reason ``art`` fails it, or None."""
    cfg = ctx.config
    on_check = ctx.eval_data is None or cfg.budget.max_accuracy_drop is None
    cos = (art.details.get("check") or {}).get("cosine_min")
    if art.precision == "int8" or not on_check or cfg.min_cosine is None or cos is None:
        return None
    if cos >= cfg.min_cosine:
        return None
    return (
        f"quality gate: worst-sample cosine {cos:.4g} with the float model is below "
        f"min_cosine {cfg.min_cosine:g}"
    )
