"""The ``ort-static-int8-accuracy-aware`` stage: :func:`sdk.quantize.accuracy_aware_quantize`
keeps the most quantization-sensitive nodes in float until the drop fits the budget's ``drop``
line. It needs eval data and a ``drop`` line, and it is only tried when no static candidate so
far meets every line and plain static int8 missed the ``drop`` line (otherwise it would return
plain static int8 unchanged, or be beaten by a candidate with more of the model in int8)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from sdk.artifact import ModelArtifact
from sdk.errors import ConfigError
from sdk.optimize.report import Candidate, SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext
from sdk.optimize.stages.ort_static import (
    ALL_OPS_SUFFIX,
    BIAS_CORRECTED_SUFFIX,
    STATIC_PREFIX,
)
from sdk.quantize import CalibMethod, QuantizeConfig

__all__ = ["ACCURACY_AWARE", "AccuracyAwareRecipe", "AccuracyAwareStage"]

ACCURACY_AWARE = f"{STATIC_PREFIX}-accuracy-aware"


#: The latency-aware candidate's name (sdk.optimize.stages.latency_aware.LATENCY_AWARE).
_LATENCY_AWARE = f"{STATIC_PREFIX}-latency-aware"


@dataclass(frozen=True)
class AccuracyAwareRecipe(Recipe):
    method: CalibMethod

    @property
    def name(self) -> str:
        return ACCURACY_AWARE

    def skip_reason(self, ctx: SearchContext, done: Sequence[Candidate]) -> str | None:
        if ctx.eval_data is None or ctx.config.budget.max_accuracy_drop is None:
            return "accuracy-aware int8 needs eval data and a 'drop' budget line to aim for"
        static = [c for c in done if c.name.startswith(STATIC_PREFIX) and c.error is None]
        meeting = next(
            (c for c in static if c.meets_budget and not c.name.endswith(ALL_OPS_SUFFIX)), None
        )
        if meeting is not None and meeting.name == _LATENCY_AWARE:
            return (
                f"{meeting.name} already meets every budget line, with only the nodes slower "
                "in int8 kept in float: keeping others in float cannot make it faster"
            )
        if meeting is not None:
            return (
                f"{meeting.name} already meets every budget line with every default operator "
                "in int8: keeping nodes in float cannot make it smaller or faster"
            )
        quality_ok = [  # plain static int8 (not latency-aware, which keeps nodes in float)
            c
            for c in static
            if all(line.passed for line in c.budget_lines if line.name == "drop")
            and not c.name.endswith((ALL_OPS_SUFFIX, BIAS_CORRECTED_SUFFIX))
            and c.name != _LATENCY_AWARE
        ]
        if quality_ok:
            return (
                f"{quality_ok[0].name} already meets the drop line: the accuracy-aware search "
                "would return plain static int8 unchanged"
            )
        return None

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        from sdk.quantize import accuracy_aware_quantize

        max_drop = ctx.config.budget.max_accuracy_drop
        if ctx.eval_data is None or max_drop is None:  # skip_reason rules this out
            raise ConfigError("accuracy-aware int8 needs eval data and a 'drop' budget line")
        artifact, report = accuracy_aware_quantize(
            ctx.fp32,
            ctx.require_calibration(),
            ctx.eval_data,
            max_drop=max_drop,
            max_excluded=ctx.config.max_excluded_nodes,
            out=path,
            config=QuantizeConfig(method=self.method, reduce_range=ctx.reduce_range),
            calibration_cache=ctx.calibration_cache,
        )
        details = dict(artifact.details.get("accuracy_aware") or {})
        details["most_sensitive"] = [t.to_dict() for t in report.tensors[:5]]
        details["notes"] = list(report.notes)
        return replace(artifact, recipe=ACCURACY_AWARE).with_details(accuracy_aware=details)


class AccuracyAwareStage:
    name = "accuracy-aware"

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        methods = ctx.config.static_methods
        if ctx.calibration is None or not methods or not ctx.config.try_accuracy_aware:
            return []
        if ctx.nothing_to_quantize or ctx.no_default_ops:
            return []
        return [AccuracyAwareRecipe(methods[0])]
