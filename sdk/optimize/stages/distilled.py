"""The ``distilled-int8`` stage, with a PyTorch model, ``train_data`` and a ``student``:
:func:`sdk.distill.distill` from ``torch_model`` into a copy of the student, ONNX export,
static int8."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdk.artifact import ModelArtifact
from sdk.errors import ConfigError
from sdk.optimize.report import SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext
from sdk.optimize.stages.torch_inputs import export_and_quantize

__all__ = ["DISTILLED", "DistilledRecipe", "DistilledStage"]

DISTILLED = "distilled-int8"


@dataclass(frozen=True)
class DistilledRecipe(Recipe):
    @property
    def name(self) -> str:
        return DISTILLED

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        import copy

        from sdk.distill import distill

        teacher, student, train_data = ctx.torch_model, ctx.student, ctx.train_data
        if teacher is None or student is None or train_data is None:  # plan() rules this out
            raise ConfigError("distillation needs torch_model, student and train_data")
        epochs = ctx.config.distill_epochs
        trained, history = distill(
            teacher, copy.deepcopy(student), train_data, epochs=epochs, progress=False
        )
        details = {
            "distillation": {
                "epochs": epochs,
                "student_params": sum(p.numel() for p in trained.parameters()),
                "teacher_params": sum(p.numel() for p in teacher.parameters()),
                "final_train_loss": history.final_loss,
            }
        }
        return export_and_quantize(trained, ctx, path, "distilled+static-int8", details)


class DistilledStage:
    name = "distilled"

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        has_torch = ctx.torch_model is not None and ctx.train_data is not None
        if not has_torch or ctx.calibration is None or ctx.student is None:
            return []
        return [DistilledRecipe()]
