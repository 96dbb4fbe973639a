"""edgeship's host SDK: export, quantize, benchmark against a budget, and bundle models.

Heavy libraries load on first use: ``import sdk`` stays fast, and each public name below is
imported from its module when it is first touched.

Quick start::

    import sdk
    art = sdk.export(model, example_inputs, to="onnx", path="model.onnx")
    int8 = sdk.quantize(art, "cal.npz", out="model.int8.onnx")  # static QDQ int8
    report = sdk.benchmark(int8, target="rpi4", budget=sdk.parse_budget("p95<=5ms"))
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ModelArtifact": "sdk.artifact",
    "read_artifact": "sdk.artifact",
    "Budget": "sdk.budget",
    "BudgetLine": "sdk.budget",
    "parse_budget": "sdk.budget",
    "check_budget": "sdk.budget",
    "Dataset": "sdk.data",
    "load_dataset": "sdk.data",
    "TargetProfile": "sdk.targets",
    "get_target": "sdk.targets",
    "PROFILES": "sdk.targets",
    "export": "sdk.export",
    "quantize": "sdk.quantize",
    "QuantizeConfig": "sdk.quantize",
    "quantize_tflite": "sdk.litert_quant",
    "evaluate": "sdk.evaluate",
    "Quality": "sdk.evaluate",
    "benchmark": "sdk.bench",
    "BenchConfig": "sdk.bench",
    "BenchReport": "sdk.bench",
    "optimize": "sdk.optimize",
    "OptimizeConfig": "sdk.optimize",
    "OptimizeReport": "sdk.optimize",
    "package": "sdk.package",
    "EdgeshipError": "sdk.errors",
}

__all__ = [
    "PROFILES",
    "BenchConfig",
    "BenchReport",
    "Budget",
    "BudgetLine",
    "Dataset",
    "EdgeshipError",
    "ModelArtifact",
    "OptimizeConfig",
    "OptimizeReport",
    "Quality",
    "QuantizeConfig",
    "TargetProfile",
    "__version__",
    "benchmark",
    "check_budget",
    "evaluate",
    "export",
    "get_target",
    "load_dataset",
    "optimize",
    "package",
    "parse_budget",
    "quantize",
    "quantize_tflite",
    "read_artifact",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """Keeps ``sdk.export`` (``quantize``, ``evaluate``, ...) the function, not its module.

    Importing a submodule such as ``sdk.export`` binds the module object to the package's
    attribute of the same name, hiding the function of that name; this puts the function back.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            isinstance(value, types.ModuleType)
            and _EXPORTS.get(name) == value.__name__
            and hasattr(value, name)
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from sdk.artifact import ModelArtifact, read_artifact
    from sdk.bench import BenchConfig, BenchReport, benchmark
    from sdk.budget import Budget, BudgetLine, check_budget, parse_budget
    from sdk.data import Dataset, load_dataset
    from sdk.errors import EdgeshipError
    from sdk.evaluate import Quality, evaluate
    from sdk.export import export
    from sdk.litert_quant import quantize_tflite
    from sdk.optimize import OptimizeConfig, OptimizeReport, optimize
    from sdk.package import package
    from sdk.quantize import QuantizeConfig, quantize
    from sdk.targets import PROFILES, TargetProfile, get_target
