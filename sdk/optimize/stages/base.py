"""The interface every optimize stage implements, and what a stage is given.

A **stage** is one kind of candidate (fp32, ORT static int8, ORT dynamic int8, accuracy-aware
int8, pruned, distilled, fp16, LiteRT). Given the search's :class:`SearchContext` it plans the
**recipes** it applies to: one :class:`Recipe` per candidate to try (static int8 plans one per
calibration variant, pruning one per ratio, LiteRT one per ai-edge-quantizer recipe), or a
:class:`~sdk.optimize.report.SkippedRecipe` naming a candidate it cannot make here and why
(fp16 on a CPU board). A recipe knows its candidate's name, when it is no longer worth trying
given the candidates made so far (early stopping), and how to make its model file. The search
(:mod:`sdk.optimize.search`) knows no kind by name: it runs the recipes of the registered
stages (:mod:`sdk.optimize.stages`) in order, then measures and chooses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from sdk.artifact import ModelArtifact
from sdk.data import Dataset
from sdk.errors import ConfigError
from sdk.optimize.config import OptimizeConfig
from sdk.optimize.report import Candidate, SkippedRecipe
from sdk.targets import RUNTIMES, TargetProfile

if TYPE_CHECKING:
    import torch

    from sdk.training import TrainData

__all__ = ["Recipe", "SearchContext", "Stage"]


@dataclass(frozen=True)
class SearchContext:
    """Everything a stage may read: the settings, the fp32 model and the data, each loaded once
    at the search's entrance (``Dataset``, not the loose forms the public call accepts)."""

    config: OptimizeConfig
    fp32: ModelArtifact
    calibration: Dataset | None
    eval_data: Dataset | None
    target: TargetProfile
    calibration_cache: Path | None
    torch_model: torch.nn.Module | None = None
    train_data: TrainData | None = None
    student: torch.nn.Module | None = None
    #: Why no operator of ``fp32`` has an int8 form (a scikit-learn tree ensemble), or None:
    #: with a reason, the stages that quantize ``fp32`` with ONNX Runtime plan nothing.
    nothing_to_quantize: str | None = None
    #: Why no operator of the default int8 types is in ``fp32`` (a k-NN graph), or None
    #: (:func:`sdk.optimize.stages.ort_static.no_default_ops`): with a reason, the plain static
    #: candidate says so and the others that quantize those types plan nothing.
    no_default_ops: str | None = None
    #: The runtimes candidates may use (:func:`sdk.optimize.runtimes.allowed_runtimes`).
    runtimes: tuple[str, ...] = RUNTIMES
    #: Whether every ONNX Runtime int8 candidate takes 7-bit weights: ``config.reduce_range``,
    #: or where that is None, whether the target's or this host's int8 kernels saturate
    #: (:func:`sdk.isa.saturation`, whose reason is in ``reduce_range_why``).
    #: The search (``sdk.optimize.search._context``) fills these two and ``no_default_ops``
    #: in; a context built by hand keeps the defaults (8-bit weights, default ops present).
    reduce_range: bool = False
    reduce_range_why: str | None = None

    def require_calibration(self) -> Dataset:
        """The calibration data of a recipe that was only planned because there is some."""
        if self.calibration is None:
            raise ConfigError("this candidate needs calibration data (pass --calibration)")
        return self.calibration


class Recipe(ABC):
    """One candidate to try: its name, its early-stopping rule and how to make its model.

    ``baseline``: the recipe every drop is measured from (fp32): never skipped, evaluated
    without a reference, and a failure to make it ends the search. ``one_by_one``: evaluate at
    batch 1, as a board runs it (dynamic int8, whose activation scales depend on the batch).
    ``suffix``: the model file's, which names its format (``.onnx``, ``.tflite``).
    """

    baseline: ClassVar[bool] = False
    one_by_one: ClassVar[bool] = False
    suffix: ClassVar[str] = ".onnx"

    @property
    @abstractmethod
    def name(self) -> str:
        """The candidate's name in the report (``ort-static-int8-minmax``, ``fp16``, ...)."""

    def skip_reason(self, ctx: SearchContext, done: Sequence[Candidate]) -> str | None:
        """Why this recipe is no longer worth trying given the candidates ``done`` so far, or
        None to try it. The time limit is the search's rule, not the recipe's."""
        return None

    @abstractmethod
    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        """Write the candidate's model to ``path`` and describe it; raise an
        :class:`~sdk.errors.EdgeshipError` when it cannot be made (recorded, the search goes on)."""


class Stage(Protocol):
    """One kind of candidate, registered once in :mod:`sdk.optimize.stages`."""

    @property
    def name(self) -> str:
        """The stage's registry key (``ort-static``, ``pruned``, ...)."""
        ...

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        """The recipes this stage applies to for ``ctx`` (none when it does not apply), in the
        order they are tried, and the ones it cannot make here with the reason."""
        ...
