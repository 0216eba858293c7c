"""What import-linter cannot see: pure modules read no files and call no `os` I/O either;
scripts and benchmarks (not packages) import no `tests` and patch no `sys.path`.

The pure modules are the "Pure modules do no I/O" contract of pyproject.toml, which must list
exactly the "pure core" rows of docs/architecture.md.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OS_PURE = {"fsdecode", "fsencode", "sep", "PathLike"}  # names, not I/O
# Methods that read or change the file system when called on a path (pathlib, os.DirEntry).
PATH_IO = {"read_text", "read_bytes", "write_text", "write_bytes", "iterdir", "open", "stat",
           "lstat", "is_dir", "is_file", "exists", "glob", "rglob", "readlink", "resolve",
           "touch", "mkdir", "unlink", "rename", "rmdir", "scandir", "listdir"}


def pure_modules() -> list[str]:
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"]
    (pure,) = [c for c in contracts if c["name"] == "Pure modules do no I/O"]
    return list(pure["source_modules"])


@pytest.mark.parametrize("module", pure_modules())
def test_a_pure_module_calls_no_file_or_os_io(module: str) -> None:
    path = REPO / (module.replace(".", "/") + ".py")
    problems = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("open", "__import__", "exec", "eval"):
            problems.append(f"line {node.lineno}: {node.func.id}()")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in PATH_IO:
            problems.append(f"line {node.lineno}: .{node.func.attr}()")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == "os" and node.attr not in OS_PURE:
            problems.append(f"line {node.lineno}: os.{node.attr}")
    assert problems == [], f"{module} does I/O: {problems}"


def test_the_pure_contract_is_the_pure_core_of_the_architecture_doc() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text()
    rows = doc[doc.index("| pure core |"):].split("\n\n")[0].splitlines()
    documented = {f"agent.{name}" for row in rows
                  for name in re.findall(r"`(\w+)`", row.split("|")[2])}
    assert documented == set(pure_modules())


def outside_tests() -> list[Path]:
    """Python code outside tests/ that is not the agent: devkit, benchmarks, Python scripts."""
    scripts = [p for p in sorted((REPO / "scripts").iterdir()) if p.is_file()
               and (p.suffix == ".py" or p.read_bytes().startswith(b"#!/usr/bin/env python"))]
    return [*sorted((REPO / "devkit").rglob("*.py")), *sorted((REPO / "benchmarks").rglob("*.py")),
            *scripts]


@pytest.mark.parametrize("path", outside_tests(), ids=lambda p: str(p.relative_to(REPO)))
def test_code_outside_tests_imports_devkit_not_tests(path: Path) -> None:
    """Scripts and benchmarks import the development kit like any package: no `tests`, no
    `sys.path` edits (import-linter checks devkit itself too; scripts are not packages)."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        problems += [f"line {node.lineno}: imports {n}" for n in names
                     if n == "tests" or n.startswith("tests.")]
        if isinstance(node, ast.Attribute) and node.attr == "path" and \
                isinstance(node.value, ast.Name) and node.value.id == "sys":
            problems.append(f"line {node.lineno}: sys.path")
    assert problems == [], f"{path.relative_to(REPO)}: {problems}"


def test_the_scripts_and_benchmarks_are_all_checked() -> None:
    checked = {p.relative_to(REPO).as_posix() for p in outside_tests()}
    assert {"scripts/demo", "benchmarks/remediate.py", "devkit/agents.py"} <= checked
