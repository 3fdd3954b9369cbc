"""The package's floors (docs/architecture.md) hold: import-linter's contracts in pyproject.toml pass,
and every import inside a function says why it is not at module level."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                          "sys.exit(lint_imports_command())"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "No module named 'importlinter'" not in run.stderr, "import-linter is missing: pip install -e '.[test]'"
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_func and isinstance(child, (ast.Import, ast.ImportFrom)):
                module = child.module if isinstance(child, ast.ImportFrom) else child.names[0].name
                if (module or "").startswith("moeinfer"):
                    found.append((child.lineno, ast.unparse(child)))
            visit(child, in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def test_function_level_imports_give_a_reason() -> None:
    missing = []
    for path in sorted((ROOT / "moeinfer").rglob("*.py")):
        lines = path.read_text().split("\n")
        for lineno, stmt in _function_level_imports(path):
            above = lineno - 2
            while above >= 0 and lines[above].strip().startswith(("from moeinfer", "import moeinfer")):
                above -= 1  # a run of imports shares one reason
            while above > 0 and lines[above].strip().startswith("#") and "Imported here:" not in lines[above]:
                above -= 1  # the reason may run over several comment lines
            if above < 0 or not lines[above].strip().startswith("# Imported here:"):
                missing.append(f"{path.relative_to(ROOT)}:{lineno}: {stmt}")
    assert not missing, "imports inside functions need a '# Imported here: <reason>' line:\n" + "\n".join(missing)
