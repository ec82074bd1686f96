"""The benchmark scripts run on the GPU machine only, so nothing else notices when the library renames what they
import: every ``actsparse`` module and name they import must exist (calibration_memory.py imported two that did
not, found only when run)."""

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, module, name or None)`` for each import of an actsparse module in ``path`` (any depth)."""
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "actsparse":
            out += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "actsparse"]
    return out


def test_there_are_benchmark_scripts_that_import_actsparse():
    assert sum(bool(_imports(p)) for p in SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_every_actsparse_name_a_benchmark_imports_exists(script):
    missing = []
    for line, module, name in _imports(script):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{script.name}:{line}: {module} ({e})")
            continue
        if name is not None and name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module}.{name}")
    assert not missing, "\n".join(missing)
