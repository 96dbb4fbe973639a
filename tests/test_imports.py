"""The shape of the imports: no cycle among the project's modules, and contracts that load alone.

A cycle hidden by an import inside a function still couples two modules both ways (neither can
be understood, tested or moved without the other), so the walk reads every import statement,
in functions too. Only imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import device_agent.contracts

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("sdk", "device_agent", "collector")

# Cycles (strongly connected groups of modules) that exist today and are being removed. The
# test requires this set to match what it finds exactly: remove an entry with its fix, and a
# new cycle fails the test.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_files() -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> file."""
    out: dict[str, Path] = {}
    for package in PACKAGES:
        root = REPO / package
        for file in root.rglob("*.py"):
            parts = list(file.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = file
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements anywhere under ``node`` (functions included), except the body of an
    ``if TYPE_CHECKING:`` (its ``else:`` runs, so it is walked)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` means: itself, else its nearest enclosing package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports_of(module: str, file: Path, modules: dict[str, Path]) -> set[str]:
    is_package = file.name == "__init__.py"
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    out: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            # "from pkg import name": the submodule pkg.name when there is one, else pkg.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                out.add(resolved)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: _imports_of(name, file, modules) for name, file in modules.items()}


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively (the graph is a few hundred modules deep at most)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(group)
    return groups


def _one_cycle(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A concrete cycle through the group's first module, for the failure message."""
    start = min(group)
    paths: dict[str, list[str]] = {start: [start]}
    frontier = [start]
    while frontier:
        nxt: list[str] = []
        for node in frontier:
            for child in sorted(graph[node] & group):
                if child == start:
                    return [*paths[node], start]
                if child not in paths:
                    paths[child] = [*paths[node], child]
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{sorted(group)} is not a cycle")  # Tarjan said it was


def test_the_walk_sees_imports_in_functions_and_skips_type_checking_ones() -> None:
    graph = import_graph()
    assert "device_agent.contracts.messages" in graph["device_agent.mqtt.publisher"]
    # device_agent/__init__.py names its exports only under TYPE_CHECKING (loaded lazily).
    assert "device_agent.agent" not in graph["device_agent"]
    # sdk/reference.py imports the runtime inside reference_stats.
    assert "device_agent.runtime" in graph["sdk.reference"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = {frozenset(group) for group in _strongly_connected(graph)}
    described = "\n".join(
        " -> ".join(_one_cycle(set(group), graph)) for group in sorted(found, key=sorted)
    )
    new = found - KNOWN_CYCLES
    assert not new, f"import cycles:\n{described}"
    fixed = KNOWN_CYCLES - found
    assert not fixed, f"fixed cycles still listed in KNOWN_CYCLES: {[sorted(g) for g in fixed]}"


# Imports point one way (docs/architecture.md): the agent imports neither other program, the
# collector never the SDK (its install carries no sdk dependency's libraries), the SDK both.
FORBIDDEN = {"device_agent": ("sdk", "collector"), "collector": ("sdk",)}


def test_imports_point_one_way() -> None:
    graph = import_graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if target.split(".")[0] in FORBIDDEN.get(module.split(".")[0], ())
    )
    assert not wrong, wrong


CONTRACTS = sorted(
    f"device_agent.contracts.{m.name}"
    for m in pkgutil.iter_modules(device_agent.contracts.__path__)
)
# What a contract module may load besides the other contracts (the exception tree included:
# device_agent.contracts.errors): the package roots, nothing of the agent.
ALLOWED = {"device_agent", "device_agent.contracts"}


@pytest.mark.parametrize("module", CONTRACTS)
def test_a_contract_module_loads_alone(module: str) -> None:
    probe = (
        f"import {module}, sys\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('device_agent', 'sdk', 'collector', 'numpy', 'paho'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    loaded = set(out.stdout.split())
    assert module in loaded  # the probe really ran
    others = {m for m in loaded if m not in ALLOWED and not m.startswith("device_agent.contracts.")}
    assert not others, f"importing {module} loads {sorted(others)}"


def test_import_device_agent_loads_nothing_else() -> None:
    """``import device_agent`` is the package root alone: its exports load on first use."""
    probe = "import device_agent, sys; print(sorted(m for m in sys.modules if 'device_agent' in m))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "['device_agent']"


def test_lazy_exports_resolve() -> None:
    import device_agent

    probe = (
        "import device_agent\n"
        "for name in device_agent.__all__:\n"
        "    assert getattr(device_agent, name) is not None, name\n"
        "print(sorted(device_agent.__all__) == sorted(set(device_agent.__all__)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "True"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = device_agent.nope
