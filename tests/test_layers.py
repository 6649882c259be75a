"""Imports point one way: ``protocol`` ← ``live`` ← ``clients`` / ``bench``; ``tests`` import
anything and nothing imports ``tests``; no import cycle between the modules of one package.

Read from the source with ``ast``, so every import counts: at module level, inside a function
(a lazy import is still a dependency), and under ``if TYPE_CHECKING:`` (a type-only cycle is
still two modules that cannot be read apart).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "live", "clients", "bench")

FORBIDDEN: dict[str, frozenset[str]] = {
    "protocol": frozenset({"live", "clients", "bench", "tests"}),
    "live": frozenset({"clients", "bench", "tests"}),
    # The client library ships to users; the bench is a sibling that may use it, not the
    # other way round.
    "clients": frozenset({"bench", "tests"}),
    "bench": frozenset({"tests"}),
}
"""What each package must not import (``tests`` may import anything)."""


@dataclass(frozen=True)
class Import:
    source: str
    """The importing module, dotted."""
    target: str
    """The imported module, dotted (``from pkg import name`` counts as ``pkg.name`` when that
    is a module of ours, else as ``pkg``)."""
    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.source} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


ALL_MODULES: dict[str, Path] = {
    name: path for package in (*PACKAGES, "tests") for name, path in modules(package).items()
}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base.pop()  # a module's package, not the module itself
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(path: Path, source: str | None = None) -> Iterator[Import]:
    module = module_name(path)
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield Import(
                    module, submodule if submodule in ALL_MODULES else target, path, node.lineno
                )


def _ours(target: str) -> str:
    """The nearest module of ours that ``target`` names or lies in ('' if none)."""
    while target and target not in ALL_MODULES:
        target = target.rpartition(".")[0]
    return target


@pytest.mark.parametrize("package", PACKAGES)
def test_no_layer_imports_upward(package: str) -> None:
    upward = list(
        dict.fromkeys(
            str(imp)
            for path in modules(package).values()
            for imp in imports(path)
            if imp.target.split(".")[0] in FORBIDDEN[package]
        )
    )
    assert not upward, f"{package} imports a layer above it:\n" + "\n".join(upward)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_within_a_package(package: str) -> None:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Import] = {}
    for name, path in modules(package).items():
        graph.setdefault(name, set())
        for imp in imports(path):
            target = _ours(imp.target)
            if target.split(".")[0] != package or target == name:
                continue
            graph[name].add(target)
            where.setdefault((name, target), imp)
    found = cycles(graph)
    report = []
    for component in found:
        members = set(component)
        report.append(" <-> ".join(component))
        report += [
            f"    {imp}" for (a, b), imp in sorted(where.items()) if a in members and b in members
        ]
    assert not found, f"import cycles in {package}:\n" + "\n".join(report)


def test_the_check_sees_type_checking_and_lazy_imports() -> None:
    """The checker itself: an import under TYPE_CHECKING and one inside a function count."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .app import Services\n"
        "def f():\n    import bench\n"
    )
    seen = {(imp.target, imp.line) for imp in imports(ROOT / "live" / "probe.py", source)}
    assert {("live.app", 3), ("bench", 5)} <= seen
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_the_layers_above_live_plug_in_through_entry_points() -> None:
    """``livevoice`` gets the client commands, the bench and the widget's pages from the
    installed metadata, so ``live`` needs no import of them (pyproject's entry points)."""
    import bench.cli
    import clients.cli
    import clients.vts
    import clients.web
    from live.cli import COMMANDS, ROUTES, plugins

    commands = [bench.cli.add_command, clients.cli.add_commands, clients.vts.add_vts_command]
    assert plugins(COMMANDS) == commands
    assert plugins(ROUTES) == [clients.web.add_widget_routes]
