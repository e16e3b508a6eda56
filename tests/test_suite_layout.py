"""The suite's layout: shared helpers live in tests/support, so no test module imports another
(a helper defined in a test module drags that module's tests and fixtures along, and breaks
when the module is renamed or split)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module name) of every import in the file, at any depth (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_no_test_module_or_helper_imports_a_test_module():
    files = sorted(TESTS.glob("test_*.py")) + sorted((TESTS / "support").glob("*.py"))
    assert len(files) > 10, "the check found no test files: it would pass on anything"
    offences = [f"{path.relative_to(TESTS)}:{line} imports {name}" for path in files
                for line, name in imported_modules(path) if name.startswith("test_")]
    assert offences == []


def test_the_check_sees_imports_at_any_depth(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text("import os\nfrom test_a import x\n\ndef f():\n    import test_b.c\n    from . import test_d\n")
    assert imported_modules(sample) == [(1, "os"), (2, "test_a"), (5, "test_b")]
