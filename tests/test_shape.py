"""The code's shape, checked: parts a newcomer can find (issue 12, docs/architecture.md).

No product module over 600 lines (the wire contracts in ``device_agent/contracts/`` excepted:
each is the reference for one format and reads best whole) and no function over 100 lines.
``KNOWN`` lists what is still over: the test fails when anything new goes over AND when a listed
one is fixed but still listed, so the list only shrinks and always tells the truth.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdk", "device_agent", "collector")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
EXEMPT = "device_agent/contracts/"

# "path" for a module over the limit, "path:function" for a function over it.
KNOWN: set[str] = set()


def oversize(root: Path, packages: tuple[str, ...] = PACKAGES) -> set[str]:
    """Modules over ``MAX_MODULE_LINES`` and functions over ``MAX_FUNCTION_LINES`` under
    ``root``'s ``packages``, as ``path`` and ``path:function`` (paths relative to ``root``)."""
    found: set[str] = set()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            source = path.read_text(encoding="utf-8")
            if source.count("\n") > MAX_MODULE_LINES and not rel.startswith(EXEMPT):
                found.add(rel)
            for node in ast.walk(ast.parse(source, filename=rel)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    assert node.end_lineno is not None
                    if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                        found.add(f"{rel}:{node.name}")
    return found


def test_no_module_over_600_lines_and_no_function_over_100() -> None:
    found = oversize(ROOT)
    new = sorted(found - KNOWN)
    fixed = sorted(KNOWN - found)
    assert not new, (
        f"over the limits ({MAX_MODULE_LINES} lines a module, {MAX_FUNCTION_LINES} a "
        f"function; split along a seam, see docs/architecture.md): {new}"
    )
    assert not fixed, f"within the limits now: remove from KNOWN: {fixed}"


def test_the_checker_finds_what_is_over_and_only_that(tmp_path: Path) -> None:
    pkg = tmp_path / "sdk"
    pkg.mkdir()
    lines = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    (pkg / "fits.py").write_text(f"def small():\n{lines}\n")  # exactly 100 lines
    (pkg / "big.py").write_text(f"def large():\n{lines}\n    return 1\n")  # 101
    (pkg / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (pkg / "edge.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    contracts = tmp_path / "device_agent" / "contracts"
    contracts.mkdir(parents=True)
    (contracts / "wire.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert oversize(tmp_path, ("sdk", "device_agent")) == {"sdk/big.py:large", "sdk/long.py"}
