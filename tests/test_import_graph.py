"""The import graph of ``fsdp_core`` and ``verify``, built from their sources: no cycles.

Every ``import`` and ``from ... import`` counts, at module level and inside functions (a lazy
import is still a dependency; it only hides it), and so does ``importlib.import_module`` with a
literal name. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg`` (its ``__init__``: importing a package's name runs the package). Importing a submodule
is not counted as an edge to its parent packages (Python runs them first, but a package's
``__init__`` importing its own submodules is no cycle).

Both packages are checked strictly.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fsdp_core", "verify")

def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``PACKAGES``."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, is_pkg: bool, level: int, name: Optional[str]) -> str:
    """The absolute name of a ``from <level dots><name> import`` inside ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _in_function(parents: list[ast.AST]) -> bool:
    return any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) for p in parents)


def imports_of(module: str, path: Path, modules: set[str]) -> Iterator[tuple[str, ast.AST, bool]]:
    """(imported module of ours, the import node, whether it is inside a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = _is_package(path)

    def ours(name: str) -> Optional[str]:
        # the longest prefix of ``name`` that is one of our modules
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in modules:
                return cand
        return None

    def visit(node: ast.AST, parents: list[ast.AST]):
        local = _in_function(parents)
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = ours(alias.name)
                if target:
                    yield target, node, local
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_pkg, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else ours(base)
                if target:
                    yield target, node, local
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                name = _resolve(module, is_pkg, level, name.lstrip(".") or None)
            target = ours(name)
            if target:
                yield target, node, True
        for child in ast.iter_child_nodes(node):
            yield from visit(child, parents + [node])

    yield from visit(tree, [])


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    graph: dict[str, set[str]] = {m: set() for m in names}
    for module, path in files.items():
        for target, _, _ in imports_of(module, path, names):
            if target != module:
                graph[module].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's components with more than one module (a cycle each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def cycle_edges(graph: dict[str, set[str]], prefix: str) -> set[tuple[str, str]]:
    """Edges between modules of one cycle (both under ``prefix``): each lies on a cycle."""
    edges = set()
    for comp in strongly_connected(graph):
        for a in comp:
            for b in graph[a] & comp:
                if a.split(".")[0] == prefix:
                    edges.add((a, b))
    return edges


def a_cycle_through(graph: dict[str, set[str]], a: str, b: str) -> list[str]:
    """a -> b -> ... -> a, shortest (breadth first from b back to a)."""
    prev: dict[str, Optional[str]] = {b: None}
    queue = [b]
    while queue:
        v = queue.pop(0)
        if v == a:
            break
        for w in sorted(graph[v]):
            if w not in prev:
                prev[w] = v
                queue.append(w)
    path, v = [], a
    while v is not None:
        path.append(v)
        v = prev[v]
    return [a] + path[::-1][: -1] + [a] if len(path) > 1 else [a, b, a]


def _describe(graph, edges) -> str:
    return "\n".join(" -> ".join(a_cycle_through(graph, a, b)) for a, b in sorted(edges))


# ------------------------------------------------------------------------------------ tests
def test_the_graph_sees_relative_absolute_and_lazy_imports():
    graph = import_graph()
    assert "fsdp_core._collectives" in graph["fsdp_core._flat_param"]        # from . import _collectives as C
    assert "fsdp_core._traverse" in graph["fsdp_core.checkpoint"]            # from .._traverse import ...
    assert "fsdp_core.checkpoint" in graph["fsdp_core"]                      # importlib.import_module(".checkpoint")
    assert "verify.sharders.base" in graph["verify"]                         # a function-local import
    assert "fsdp_core" in graph["verify.sharders.fsdp_core"]                 # import fsdp_core: the __init__


def test_fsdp_core_has_no_import_cycles():
    graph = import_graph()
    edges = cycle_edges(graph, "fsdp_core")
    assert not edges, "import cycles in fsdp_core:\n" + _describe(graph, edges)


def test_fsdp_core_does_not_import_verify():
    graph = import_graph()
    bad = sorted((a, b) for a, targets in graph.items() if a.split(".")[0] == "fsdp_core"
                 for b in targets if b.split(".")[0] == "verify")
    assert not bad, bad


def test_verify_has_no_import_cycles():
    graph = import_graph()
    edges = cycle_edges(graph, "verify")
    assert not edges, "import cycles in verify:\n" + _describe(graph, edges)


MAX_LINES = 400   # "modules of at most about 400 lines" (issue 17)


def lazy_imports_without_reason(source: str) -> list[tuple[int, str]]:
    """(line, text) of every function-local import with no comment on its line or the line
    above: a lazy import hides a dependency, so it is only for an optional or heavy one, and
    says so."""
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                here = lines[inner.lineno - 1]
                above = lines[inner.lineno - 2] if inner.lineno > 1 else ""
                if "#" not in here and not above.strip().startswith("#"):
                    out.append((inner.lineno, here.strip()))
    return sorted(set(out))


@pytest.mark.parametrize("package", PACKAGES)
def test_function_local_imports_say_why(package):
    missing = [f"{path.relative_to(ROOT)}:{line}: {text}"
               for module, path in module_files().items() if module.split(".")[0] == package
               for line, text in lazy_imports_without_reason(path.read_text())]
    assert not missing, "function-local imports without a reason:\n" + "\n".join(missing)


def test_the_reason_rule_fails_on_a_bare_lazy_import():
    src = ("import os\n"
           "def f():\n"
           "    import json\n"
           "    # transformers is optional\n"
           "    import transformers\n"
           "    import torch  # heavy: not on --help\n"
           "    return json\n")
    assert lazy_imports_without_reason(src) == [(3, "import json")]


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_are_at_most_about_400_lines(package):
    long = {str(path.relative_to(ROOT)): n for module, path in module_files().items()
            if module.split(".")[0] == package
            and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_a_planted_cycle_is_found_and_described():
    graph = {"verify.a": {"verify.b"}, "verify.b": {"verify.c"}, "verify.c": {"verify.a"},
             "verify.d": {"verify.a"}, "fsdp_core.x": set()}
    edges = cycle_edges(graph, "verify")
    assert edges == {("verify.a", "verify.b"), ("verify.b", "verify.c"), ("verify.c", "verify.a")}
    assert "verify.a -> verify.b -> verify.c -> verify.a" in _describe(graph, {("verify.a", "verify.b")})
    assert not cycle_edges(graph, "fsdp_core")
