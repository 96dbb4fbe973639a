"""The ``pruned-<pct>-int8`` stage, with a PyTorch model (``torch_model``, ``train_data``): one
candidate per :attr:`~sdk.optimize.OptimizeConfig.prune_ratios`: structured pruning with
:func:`sdk.prune.prune_structured`, fine-tuning, ONNX export, static int8."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdk.artifact import ModelArtifact
from sdk.errors import ConfigError
from sdk.optimize.report import SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext
from sdk.optimize.stages.torch_inputs import export_and_quantize, torch_example

__all__ = ["PrunedRecipe", "PrunedStage"]


@dataclass(frozen=True)
class PrunedRecipe(Recipe):
    ratio: float

    @property
    def name(self) -> str:
        return f"pruned-{self.ratio * 100:g}-int8"

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        from sdk.prune import fine_tune, prune_structured

        cal = ctx.require_calibration()
        if ctx.torch_model is None or ctx.train_data is None:  # plan() rules this out
            raise ConfigError("pruning needs torch_model and train_data")
        epochs = ctx.config.fine_tune_epochs
        result = prune_structured(ctx.torch_model, torch_example(ctx.fp32, cal), self.ratio)
        pruned = result.model
        history = None
        if epochs:
            history = fine_tune(pruned, ctx.train_data, epochs=epochs, progress=False)
        pruned.eval()
        details = {
            "pruning": {
                "ratio": self.ratio,
                "fine_tune_epochs": epochs,
                "params_before": result.params_before,
                "params_after": result.params_after,
                "macs_before": result.macs_before,
                "macs_after": result.macs_after,
                "final_train_loss": None if history is None else history.final_loss,
            }
        }
        recipe = f"pruned-{self.ratio * 100:g}+fine-tune+static-int8"
        return export_and_quantize(pruned, ctx, path, recipe, details)


class PrunedStage:
    name = "pruned"

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        if ctx.torch_model is None or ctx.calibration is None or ctx.train_data is None:
            return []
        return [PrunedRecipe(ratio) for ratio in ctx.config.prune_ratios]
