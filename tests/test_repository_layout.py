"""Tests and benchmarks share their helpers through one package, ``cgidm_testkit``, and import
everything as packages from the repository root: no module edits ``sys.path``, the shared helpers
never reach back into ``tests``, and every benchmark imports as ``benchmarks.NAME``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

FOLDERS = ("benchmarks", "cgidm_testkit", "scripts", "tests")


def _python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO_ROOT / folder).rglob("*.py"))


def _edits_sys_path(tree: ast.AST) -> bool:
    """``sys.path.insert(...)``, ``sys.path.append(...)``, ``sys.path[...] = ...`` and the like."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and \
                isinstance(node.value, ast.Name) and node.value.id == "sys":
            return True
    return False


def _imports_of(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_module_edits_sys_path():
    offenders = [str(path.relative_to(REPO_ROOT)) for path in _python_files(*FOLDERS)
                 if _edits_sys_path(ast.parse(path.read_text(), str(path)))]
    assert not offenders, f"run from the repository root instead of editing sys.path: {offenders}"


def test_shared_helpers_and_benchmarks_never_import_the_tests():
    offenders = {}
    for path in _python_files("benchmarks", "cgidm_testkit", "scripts"):
        bad = {name for name in _imports_of(ast.parse(path.read_text(), str(path)))
               if name == "tests" or name.startswith("tests.")}
        if bad:
            offenders[str(path.relative_to(REPO_ROOT))] = sorted(bad)
    assert not offenders, f"move what both need into cgidm_testkit: {offenders}"


def test_no_test_imports_from_a_conftest():
    """A conftest holds fixtures; a helper imported from one is a re-export with two homes."""
    offenders = [str(path.relative_to(REPO_ROOT)) for path in _python_files("tests")
                 if any(name.split(".")[-1] == "conftest"
                        for name in _imports_of(ast.parse(path.read_text(), str(path))))]
    assert not offenders, f"import helpers from cgidm_testkit, not from a conftest: {offenders}"


@pytest.mark.parametrize("module", sorted(
    ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in _python_files("benchmarks", "cgidm_testkit")))
def test_every_benchmark_and_helper_imports_as_a_package_module(module: str):
    importlib.import_module(module)
