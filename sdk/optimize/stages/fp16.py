"""The ``fp16`` stage: only where the runtime benefits. Boards run ONNX Runtime's CPU execution
provider, whose fp16 support is a handful of kernels (it casts around the rest), so on a CPU
target fp16 is listed as skipped with that reason; ``try_fp16=True`` forces it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdk.artifact import ModelArtifact
from sdk.optimize.config import OptimizeConfig
from sdk.optimize.report import SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext
from sdk.quantize.fp16 import FP16_RECIPE, to_fp16
from sdk.targets import TargetProfile

__all__ = ["FP16", "Fp16Recipe", "Fp16Stage", "fp16_skip_reason"]

FP16 = FP16_RECIPE


@dataclass(frozen=True)
class Fp16Recipe(Recipe):
    @property
    def name(self) -> str:
        return FP16

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        return to_fp16(ctx.fp32, path)


class Fp16Stage:
    name = FP16

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        reason = fp16_skip_reason(ctx.config, ctx.target)
        if reason is None:
            return [Fp16Recipe()]
        if ctx.config.try_fp16 is False:  # asked not to: not worth a line in the report
            return []
        return [SkippedRecipe(FP16, reason)]


def fp16_skip_reason(cfg: OptimizeConfig, target: TargetProfile) -> str | None:
    """Why no fp16 candidate is made for ``target`` (None: make one)."""
    if cfg.try_fp16 is True:
        return None
    if cfg.try_fp16 is False:
        return "try_fp16=False"
    has_fp16 = "asimdhp" in target.isa
    isa = (
        f"{target.name} has fp16 arithmetic (asimdhp), but "
        if has_fp16
        else f"{target.name} has no fp16 arithmetic listed, and "
    )
    return (
        f"{isa}boards run ONNX Runtime's CPU execution provider, which has fp16 kernels for "
        "few operators and casts around the rest: fp16 would be slower than fp32 there "
        "(try_fp16=True to measure it anyway)"
    )
