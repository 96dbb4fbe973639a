"""edgeship's host SDK: export, compress, quantize, benchmark against a budget, and bundle models.

The public API is ``__all__`` below, and only that; every name in it is documented in
``docs/api.md`` (``tests/test_public_api.py`` checks both). Submodules hold the rest
(``sdk.prune.prune_unstructured``, ``sdk.detect.fit_detector``, ...) and are imported by
their full path.

Heavy libraries load on first use: ``import sdk`` stays fast (``tests/test_isolation.py``),
and each public name is imported from the module in ``_HOMES`` when it is first touched
(PEP 562's module ``__getattr__``). The ``TYPE_CHECKING`` imports tell type checkers the same
thing the table tells the interpreter.

Several public functions share their name with the submodule that defines them
(``sdk.export``, ``sdk.quantize``, ``sdk.distill``, ...). ``import sdk.distill`` would bind
the submodule to ``sdk.distill`` and hide the function, so this package refuses that binding
(:class:`_PublicNamesWin`): ``sdk.distill`` is the function whatever was imported before.
The submodules stay importable by path (``from sdk.distill import distillation_loss``).

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
    "distill",
    "evaluate",
    "export",
    "get_target",
    "load_dataset",
    "optimize",
    "package",
    "parse_budget",
    "prune",
    "quantize",
    "quantize_int4",
    "quantize_tflite",
    "read_artifact",
]

# public name -> "module" that defines it, or "module:name" where the public name differs
_HOMES: dict[str, str] = {
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
    "prune": "sdk.prune:prune_structured",
    "distill": "sdk.distill",
    "quantize": "sdk.quantize",
    "QuantizeConfig": "sdk.quantize",
    "quantize_tflite": "sdk.quantize",
    "quantize_int4": "sdk.quantize",
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

if TYPE_CHECKING:
    from sdk.artifact import ModelArtifact, read_artifact
    from sdk.bench import BenchConfig, BenchReport, benchmark
    from sdk.budget import Budget, BudgetLine, check_budget, parse_budget
    from sdk.data import Dataset, load_dataset
    from sdk.distill import distill
    from sdk.errors import EdgeshipError
    from sdk.evaluate import Quality, evaluate
    from sdk.export import export
    from sdk.optimize import OptimizeConfig, OptimizeReport, optimize
    from sdk.package import package
    from sdk.prune import prune_structured as prune
    from sdk.quantize import QuantizeConfig, quantize, quantize_int4, quantize_tflite
    from sdk.targets import PROFILES, TargetProfile, get_target


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'sdk' has no attribute {name!r}")
    module, _, attribute = home.partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _PublicNamesWin(types.ModuleType):
    """The ``sdk`` module's type: a submodule never takes the place of a public name.

    The import system binds every submodule it loads to its package's attribute of the same
    name (``import sdk.distill`` sets ``sdk.distill``); for a name in ``_HOMES`` that binding
    is dropped, so the public function stays what ``sdk.<name>`` means. The Python docs'
    "Customizing module attribute access" shows this use of a module's ``__class__``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PublicNamesWin
