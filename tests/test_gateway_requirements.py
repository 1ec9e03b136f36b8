"""The gateway image's requirements are a subset of the project's own, pinned the same way.

``docker/gateway-requirements.txt`` lists what the torch-free gateway image installs before the
project goes on top with ``pip install --no-deps .``. Kept by hand, it drifts: a version floor
raised in pyproject.toml and not here builds an image with an older library than the one the
tests ran. This test fails on any requirement of the file that pyproject.toml's
``[project.dependencies]`` does not state with the same name, extras and version specifier.
(``tests/service/test_deployment.py`` checks the other direction: that the file covers every
module the gateway imports.)
"""

from __future__ import annotations

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.paths import REPO_ROOT


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    found = [Requirement(line.split("#", 1)[0].strip()) for line in lines
             if line.split("#", 1)[0].strip()]
    return {canonicalize_name(r.name): r for r in found}


def test_gateway_requirements_are_pyprojects_own():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirements(project["dependencies"])
    gateway = _requirements(
        (REPO_ROOT / "docker" / "gateway-requirements.txt").read_text().splitlines())
    assert gateway, "docker/gateway-requirements.txt lists nothing"
    differing = {
        name: (str(req), str(declared[name]) if name in declared else "missing")
        for name, req in gateway.items()
        if name not in declared or (req.specifier, req.extras, req.marker)
        != (declared[name].specifier, declared[name].extras, declared[name].marker)
    }
    assert not differing, (
        "docker/gateway-requirements.txt and pyproject.toml [project.dependencies] disagree "
        f"(gateway file, pyproject): {differing}; change both together")
    assert not {"torch", "diffusers", "transformers"} & set(gateway), "the gateway has no torch"
