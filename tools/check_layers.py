"""Check that ``actsparse/``'s imports point one way: no cycles, no imports of package modules inside functions.

    python tools/check_layers.py            # exit 1 and a list of problems, or "ok" with the layer order

The import graph is built from the AST of every module (``import``/``from`` statements at module level and
inside functions or methods; ``if TYPE_CHECKING:`` blocks are skipped, they do not run). A package
``__init__`` counts as a module of its own. Edges go from a module to the package modules it imports; an
import of ``pkg`` from ``pkg.sub`` is an edge to ``pkg/__init__``. Reported:

* every function-level import of a package module (they hide cycles and make import order matter);
* every cycle among module-level imports (strongly connected components of more than one module).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "actsparse"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(importer: str, is_pkg: bool, level: int, target: str | None) -> str:
    """Absolute module name of ``from <level dots><target> import ...`` in module ``importer``."""
    if level == 0:
        return target or ""
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported package module, line, inside a function)`` for every import in ``path``."""
    name = module_name(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other, in_func)
                continue
            inner = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.extend((m, child.lineno, in_func) for m in _targets(alias.name, None, modules))
            elif isinstance(child, ast.ImportFrom):
                base = resolve(name, is_pkg, child.level, child.module)
                for alias in child.names:
                    out.extend((m, child.lineno, in_func) for m in _targets(base, alias.name, modules))
            visit(child, inner)

    visit(tree, False)
    return out


def _targets(base: str, attr: str | None, modules: set[str]) -> list[str]:
    if not (base == PKG or base.startswith(PKG + ".")):
        return []
    if attr is not None and f"{base}.{attr}" in modules:  # from pkg import submodule
        return [f"{base}.{attr}"]
    while base and base not in modules:  # from pkg.mod import name, or a name inside a package
        base = base.rpartition(".")[0]
    return [base] if base else []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def check(root: Path = ROOT) -> tuple[list[str], dict[str, set[str]]]:
    files = sorted((root / PKG).rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems: list[str] = []
    for path in files:
        name = module_name(path)
        for target, line, in_func in dict.fromkeys(imports(path, modules)):
            if target == name:
                continue
            if in_func:
                problems.append(f"{path.relative_to(root)}:{line}: imports {target} inside a function")
            else:
                graph[name].add(target)
    for comp in cycles(graph):
        problems.append(f"import cycle of {len(comp)} modules: {', '.join(comp)}")
    return problems, graph


def main() -> int:
    problems, graph = check()
    if problems:
        print("\n".join(problems))
        print(f"{len(problems)} problem(s)")
        return 1
    print(f"ok: {len(graph)} modules, {sum(map(len, graph.values()))} imports, no cycles, no function-level imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
