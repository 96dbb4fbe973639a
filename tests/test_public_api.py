"""The public API says what it is: every exported name resolves, and the SDK's are documented.

Each package exports its names lazily (module ``__getattr__``), so a typo in a lazy table or a
name moved away from its module only shows when the name is touched: every name is touched here,
in a fresh interpreter per package so one package's imports cannot hide another's laziness bug.
(httpx keeps the same promise with ``tests/test_exported_members.py``.)
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdk", "device_agent", "collector")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves_in_a_fresh_interpreter(package: str) -> None:
    code = f"""
import importlib, json
m = importlib.import_module({package!r})
missing = [n for n in m.__all__ if getattr(m, n, None) is None]
print(json.dumps({{"all": list(m.__all__), "missing": missing, "dir": sorted(dir(m))}}))
"""
    found = json.loads(_run(code))
    assert found["all"], f"{package}.__all__ is empty"
    assert not found["missing"], f"{package}.__all__ names that do not resolve: {found['missing']}"
    assert len(set(found["all"])) == len(found["all"]), f"{package}.__all__ repeats a name"
    assert set(found["all"]) <= set(found["dir"]), "dir() hides an exported name"


def test_sdk_lazy_table_and_type_checking_imports_match_all() -> None:
    """``__all__``, the lazy loader's table and the imports type checkers read list the same
    names: a name in one and not the others would resolve for some users and not for others."""
    import sdk

    tree = ast.parse((ROOT / "sdk" / "__init__.py").read_text(encoding="utf-8"))
    typed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom)
                typed |= {alias.asname or alias.name for alias in stmt.names}
    homes = set(sdk._HOMES)
    assert set(sdk.__all__) == homes | {"__version__"}
    assert typed == homes


def _doc_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in DOCS)


def test_every_public_sdk_name_is_documented() -> None:
    import sdk

    text = _doc_text()
    undocumented = [
        name
        for name in sdk.__all__
        if not re.search(rf"`(sdk\.)?{re.escape(name)}[`(]|\bsdk\.{re.escape(name)}\b", text)
    ]
    assert not undocumented, f"no doc mentions these public names (see docs/api.md): {undocumented}"


def _documented_calls() -> set[str]:
    """Every ``sdk.<name>(`` the README and docs write, in prose or in code."""
    return set(re.findall(r"\bsdk\.([A-Za-z_]\w*)\(", _doc_text()))


def test_documented_top_level_calls_are_callable_as_written() -> None:
    calls = _documented_calls()
    assert {"distill", "prune", "quantize", "export", "optimize"} <= calls, calls
    code = f"""
import json, sdk
names = {sorted(calls)!r}
print(json.dumps([n for n in names if not callable(getattr(sdk, n, None))]))
"""
    not_callable = json.loads(_run(code))
    assert not not_callable, f"documented as sdk.<name>(...) but not callable: {not_callable}"


def test_a_function_keeps_its_name_after_its_module_is_imported() -> None:
    """``import sdk.distill`` binds the submodule to ``sdk.distill`` by default, hiding the
    function; the package keeps the function there, before and after, in either order."""
    code = """
import types
import sdk
before = {n: getattr(sdk, n) for n in ("distill", "export", "quantize", "package")}
import sdk.distill, sdk.export, sdk.quantize, sdk.package, sdk.prune
from sdk.distill import distillation_loss
from sdk.prune import prune_structured
after = {n: getattr(sdk, n) for n in ("distill", "export", "quantize", "package")}
assert before == after, (before, after)
assert all(isinstance(f, types.FunctionType) for f in after.values()), after
assert sdk.prune is prune_structured
assert callable(distillation_loss)
print("ok")
"""
    assert _run(code).strip() == "ok"
    # the other order: the submodule first, the package's name afterwards
    code = "import sdk.distill, sdk.prune, types\nimport sdk\n" + (
        "assert isinstance(sdk.distill, types.FunctionType), sdk.distill\n"
        "assert sdk.distill.__module__ == 'sdk.distill'\n"
        "assert sdk.prune.__name__ == 'prune_structured'\nprint('ok')"
    )
    assert _run(code).strip() == "ok"


def test_an_unknown_name_is_an_attribute_error() -> None:
    import sdk

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        sdk.no_such_name  # noqa: B018
