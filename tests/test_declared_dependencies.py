"""Every third-party package the tests and benchmarks import is declared in pyproject.toml (the
project's dependencies or its ``test`` extra), not left to arrive as some other package's
dependency, which a new release of that package may drop."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions, requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.paths import REPO_ROOT

PROJECT_PACKAGES = {"app", "benchmarks", "cgidm", "cgidm_core", "cgidm_testkit", "scripts", "tests",
                    "worker"}


def _imported_top_level(folder: str) -> set[str]:
    names: set[str] = set()
    for path in (REPO_ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - PROJECT_PACKAGES


def test_every_package_the_tests_import_is_declared():
    # The installed metadata of pyproject.toml (`make venv` reinstalls when the file changes).
    requirements = [Requirement(r) for r in requires("cgidm") or []]
    declared = {canonicalize_name(r.name) for r in requirements
                if r.marker is None or r.marker.evaluate({"extra": "test"})}
    distributions = packages_distributions()
    imported = (_imported_top_level("tests") | _imported_top_level("benchmarks")
                | _imported_top_level("cgidm_testkit"))
    undeclared = {
        module: distributions.get(module)
        for module in imported
        if not any(canonicalize_name(d) in declared for d in distributions.get(module, []))
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
