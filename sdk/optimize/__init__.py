"""Budgeted search over candidate models, then a bundle of the choice (``edgeship optimize``).

:func:`optimize` is the search and the choice (:mod:`sdk.optimize.search`, whose docstring
says what is tried, in which order, and how the winner is chosen); each kind of candidate is a
stage registered in :mod:`sdk.optimize.stages`; :class:`OptimizeConfig` says what to try and
aim for; :class:`OptimizeReport` is what was found.
"""

from __future__ import annotations

from sdk.optimize.config import OptimizeConfig, default_calibration_cache
from sdk.optimize.report import Candidate, OptimizeReport, SkippedRecipe
from sdk.optimize.search import optimize

__all__ = [
    "Candidate",
    "OptimizeConfig",
    "OptimizeReport",
    "SkippedRecipe",
    "default_calibration_cache",
    "optimize",
]
