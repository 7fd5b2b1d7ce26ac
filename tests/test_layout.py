"""Rules of the source tree, checked from the source text (no module is imported): no import cycle in
atmpipe/, an import inside a function only with its reason, and no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "atmpipe"


def modules() -> dict[str, Path]:
    """atmpipe's modules by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it runs inside a function. Imports under `if TYPE_CHECKING:`
    never run and are left out."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def imported_modules(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, known) -> set[str]:
    """The atmpipe modules an import statement in module `name` names (`from pkg import mod` names pkg.mod)."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    found = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the atmpipe modules it imports, at the top or inside a function alike."""
    known = modules()
    return {
        name: set().union(
            *(
                imported_modules(node, name, path.name == "__init__.py", known)
                for node, _ in imports(ast.parse(path.read_text()))
            )
        )
        for name, path in known.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    # A submodule importing its own package is a cycle too (the package imports its submodules).
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def unexplained_function_imports(path: Path) -> list[str]:
    """Imports inside functions without a reason: a comment on the import's line or the line above, or
    directly after another such import (a group of lazy imports shares one reason)."""
    lines = path.read_text().splitlines()
    found = []
    explained_until = -1
    for node, in_function in sorted(imports(ast.parse("\n".join(lines))), key=lambda x: x[0].lineno):
        if not in_function:
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        own = any("#" in lines[i] for i in range(first, last + 1))
        above = lines[first - 1].strip().startswith("#")
        if own or above or explained_until == first - 1:
            explained_until = last
        else:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {lines[first].strip()}")
    return found


def test_imports_inside_functions_say_why():
    """Imports belong at the top; one inside a function defers an optional or heavy dependency (torch,
    the LM, zarr) off a path that must stay light, such as `atmpipe --help`, and says so."""
    found = [hit for path in modules().values() for hit in unexplained_function_imports(path)]
    assert found == []


# stages/crosscheck.py and stages/verdict.py are being split elsewhere; they join the rule once that lands.
LONG_FUNCTION_EXEMPT: set[str] = set()


def long_functions(limit: int = 80) -> list[str]:
    found = []
    for root in ("atmpipe", "stages", "benchmarks"):
        for path in sorted((REPO / root).rglob("*.py")):
            if str(path.relative_to(REPO)) in LONG_FUNCTION_EXEMPT:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_function_over_80_lines():
    assert long_functions() == []
