"""The floors of the code base and which way imports may run between them.

    cgidm_core   the method library: imports none of the others (usable on its own)
    cgidm        the shared layer (settings, storage, jobs, client): may import cgidm_core
    app, worker  the gateway and the GPU workers: may import cgidm and cgidm_core, not each other
    cli          the command line (cgidm/cli.py, cgidm/commands/): a front end like the gateway,
                 which may also use the gateway's torch-free report renderer (``cgidm report``);
                 nothing but the CLI imports it
    benchmarks, cgidm_testkit, scripts, tests: may import anything; nothing else imports them
                 (cgidm_testkit serves tests and benchmarks; benchmarks serve no one)

The test reads every module's ``import`` statements with :mod:`ast`, including imports inside
functions (a lazy import is still an arrow), so a new back arrow fails here before it spreads.
``tests/service/test_import_boundaries.py`` checks the other half: what a process actually loads
(no torch in the gateway).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

#: What each floor may import of the project's own packages (itself always allowed).
ALLOWED: dict[str, frozenset[str]] = {
    "cgidm_core": frozenset(),
    "cgidm": frozenset({"cgidm_core"}),
    "app": frozenset({"cgidm", "cgidm_core"}),
    "cli": frozenset({"cgidm", "cgidm_core", "app"}),
    "worker": frozenset({"cgidm", "cgidm_core"}),
    "cgidm_testkit": frozenset({"cgidm", "cgidm_core", "app", "worker", "cli"}),
    "benchmarks": frozenset({"cgidm", "cgidm_core", "app", "worker", "cli", "cgidm_testkit"}),
    "scripts": frozenset({"cgidm", "cgidm_core", "app", "worker", "cli", "cgidm_testkit"}),
    "tests": frozenset({"cgidm", "cgidm_core", "app", "worker", "cli", "cgidm_testkit",
                        "benchmarks"}),
}
PROJECT_PACKAGES = frozenset(ALLOWED) - {"cli"}
#: The command line's modules, a floor of their own inside the ``cgidm`` package.
CLI_MODULES = ("cgidm.cli", "cgidm.commands")


def _floor_of_module(name: str) -> str:
    """The floor a dotted module name belongs to."""
    if any(name == m or name.startswith(m + ".") for m in CLI_MODULES):
        return "cli"
    return name.split(".")[0]


def _imported_packages(path: Path) -> set[tuple[str, int]]:
    """(floor, line) for every absolute import of a project module in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in PROJECT_PACKAGES:
                found.add((_floor_of_module(name), node.lineno))
    return found


def _modules(floor: str) -> list[Path]:
    """The files of one floor (the CLI's files are not counted in ``cgidm``'s)."""
    cli = [REPO_ROOT / "cgidm" / "cli.py", *(REPO_ROOT / "cgidm" / "commands").rglob("*.py")]
    if floor == "cli":
        return sorted(cli)
    files = (p for p in (REPO_ROOT / floor).rglob("*.py") if ".venv" not in p.parts)
    return sorted(p for p in files if p not in cli)


def test_every_floor_has_modules():
    for package in ALLOWED:
        assert _modules(package), f"{package}/ has no modules: is ALLOWED out of date?"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_only_down_the_floors(package: str):
    allowed = ALLOWED[package] | {package}
    back_arrows = [f"{path.relative_to(REPO_ROOT)}:{line} imports {top}"
                   for path in _modules(package)
                   for top, line in sorted(_imported_packages(path)) if top not in allowed]
    assert not back_arrows, "imports against the floors:\n" + "\n".join(back_arrows)


def test_benchmarks_do_not_import_each_other_in_a_circle():
    graph: dict[str, set[str]] = {}
    for path in _modules("benchmarks"):
        tree = ast.parse(path.read_text())
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                targets.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                targets |= {a.name.split(".")[1] for a in node.names
                            if a.name.startswith("benchmarks.")}
        graph[path.stem] = targets - {path.stem}
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a]
                    if a < b and a in graph.get(b, set()))
    assert not cycles, f"benchmark modules that import each other: {cycles}"
