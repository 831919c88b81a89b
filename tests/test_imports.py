"""Imports point one way: configs <- workers, slurm <- orchestrator <- dashboards, the CLI
included (a command of a package above it comes through an entry point, loaded by name), and no
module imports itself back through others.

Read from the source with ``ast`` (every ``import``, also those inside functions), so a lazy
import that closes a cycle is caught as well as one at the top of a file.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"configs": 0, "workers": 1, "slurm": 1, "orchestrator": 2, "dashboards": 3}
SEES_EVERYTHING: set[str] = set()  # modules the layering may exempt: none


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in LAYERS for p in (ROOT / top).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (the deepest known module of each dotted name)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            parts = target.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in known:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        if module in SEES_EVERYTHING:
            continue
        top = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != top and LAYERS[other] >= LAYERS[top]:
                bad.append(f"{module} imports {target} ({top} must not depend on {other})")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring the CLI."""
    graph = {m: {t for t in ts if t not in SEES_EVERYTHING} for m, ts in graph.items() if m not in SEES_EVERYTHING}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_init_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exporting its own submodules is not a cycle: drop those edges."""
    return {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}


def test_imports_point_one_way():
    assert layer_violations(import_graph()) == []


def test_no_import_cycles():
    assert cycles(_package_init_edges(import_graph())) == []


@pytest.mark.parametrize("edge, expected", [
    ({"workers.lake.store": {"orchestrator.store"}}, "workers.lake.store imports orchestrator.store"),
    ({"slurm.pools": {"workers.rl.specialist"}}, "slurm.pools imports workers.rl.specialist"),
    ({"orchestrator.status": {"dashboards.data"}}, "orchestrator.status imports dashboards.data"),
])
def test_a_backwards_import_is_reported(edge, expected):
    graph = {**import_graph(), **edge}
    assert any(v.startswith(expected) for v in layer_violations(graph))


def test_the_cli_gets_the_dashboard_command_through_an_entry_point():
    """``orchestrator.cli`` imports nothing of ``dashboards``; the commands declared in the group
    ``pianoforge.commands`` are all on the CLI, each the function the declaration names."""
    import importlib

    from orchestrator.cli import app

    assert not {t for t in import_graph()["orchestrator.cli"] if t.startswith("dashboards")}
    declared = _pyproject()["project"]["entry-points"]["pianoforge.commands"]
    assert "dashboard" in declared
    commands = {c.name: c.callback for c in app.registered_commands}
    for name, target in declared.items():
        module, _, function = target.partition(":")
        assert commands[name] is getattr(importlib.import_module(module), function)


def test_a_command_that_fails_to_load_is_left_out_with_a_warning(monkeypatch, capsys):
    import importlib.metadata

    import typer

    from orchestrator import cli

    broken = importlib.metadata.EntryPoint("broken", "dashboards.no_such_module:command", "pianoforge.commands")
    fine = importlib.metadata.EntryPoint("dashboard", "dashboards.cli:dashboard", "pianoforge.commands")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [broken, fine])
    target = typer.Typer()
    cli._add_registered_commands(target)
    assert [c.name for c in target.registered_commands] == ["dashboard"]
    assert "command 'broken' (dashboards.no_such_module:command) not loaded: ModuleNotFoundError" in capsys.readouterr().err


def test_a_new_cycle_is_reported():
    graph = import_graph()
    graph["workers.piano.layout"] = graph["workers.piano.layout"] | {"workers.lake.schema"}
    assert any({"workers.piano.layout", "workers.lake.schema"} <= set(c) for c in cycles(graph))


# --- what the project imports from others is declared, and what it ships exists ---------------
def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _distribution(requirement: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0]).lower()


@functools.lru_cache(maxsize=1)
def third_party_imports() -> dict[str, tuple[set[str], tuple[str, ...]]]:
    """Third-party top-level module -> (the distributions that provide it, normalised; the
    project modules that import it)."""
    import sys
    from importlib.metadata import packages_distributions

    provided = packages_distributions()
    found: dict[str, list[str]] = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in LAYERS and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, []).append(name)
    return {top: ({_distribution(d) for d in provided.get(top, [])}, tuple(users)) for top, users in found.items()}


def undeclared_imports(declared: set[str]) -> dict[str, tuple[str, ...]]:
    """Third-party modules the project imports whose distribution is not in ``declared``, with their importers."""
    return {top: users for top, (dists, users) in third_party_imports().items() if not dists & declared}


def test_every_third_party_import_is_a_declared_dependency():
    declared = {_distribution(r) for r in _pyproject()["project"]["dependencies"]}
    assert undeclared_imports(declared) == {}
    # The check sees an import that only arrives with another package (robopianist brings both).
    assert {"mujoco_utils", "note_seq"} <= set(undeclared_imports(declared - {"mujoco-utils", "note-seq"}))


def test_package_data_names_files_that_exist():
    for package, patterns in _pyproject()["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((ROOT / package).glob(pattern)), f"pyproject.toml ships {package}/{pattern}: no such file"
