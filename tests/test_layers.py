"""The import graph keeps one direction: the command line (``anyflow/cli/``) sits on top.

Parsed from the source (``ast``), not from what happens to be imported at run time, so a lazy import inside
a function counts as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("anyflow", "components", "pipelines")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_nothing_below_the_command_line_imports_it():
    cli = ROOT / "anyflow" / "cli"
    offenders = []
    for path in _sources():
        if cli in path.parents:
            continue
        bad = sorted(m for m in _imports(path) if m == "anyflow.cli" or m.startswith("anyflow.cli."))
        if bad:
            offenders.append(f"{path.relative_to(ROOT)}: {', '.join(bad)}")
    assert not offenders, "modules below the command line import it:\n" + "\n".join(offenders)


def test_the_scan_sees_the_command_line_package():
    # Control for the test above: the scan must find the imports it is looking for where they legitimately
    # are (the entry module imports its command modules), or an empty result would prove nothing.
    init = ROOT / "anyflow" / "cli" / "__init__.py"
    assert "anyflow.cli.run" in _imports(init)
    assert len(_sources()) > 50


def test_domain_modules_carry_no_argparse_hooks():
    # storage, registry, redistill, sample and bench are libraries; their commands are anyflow/cli/<group>.py.
    for rel in ("anyflow/storage.py", "anyflow/registry.py", "anyflow/ops/redistill.py", "anyflow/ops/__init__.py",
                "anyflow/sample.py", "anyflow/bench.py"):
        tree = ast.parse((ROOT / rel).read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "add_cli" not in names, f"{rel} still registers a command (add_cli)"
