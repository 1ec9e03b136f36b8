"""A Python client generated from a running gateway's /openapi.json, as a user would make one.

openapi-python-client runs with the config the repository ships (docs/openapi-python-client.yaml)
plus two test-only settings: no formatting hooks (ruff is not the point and need not be on PATH)
and a package name of the caller's choosing. Any generator warning (an operation or a response
left out of the client) fails it. The package is written into a temporary folder and imported
from there without touching ``sys.path``; it is never committed.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

GENERATOR_CONFIG = Path(__file__).resolve().parents[1] / "docs" / "openapi-python-client.yaml"
TERMINAL = ("succeeded", "failed", "cancelled")


def generate(url: str, folder: Path, package: str) -> Path:
    """Generate the client of the gateway at ``url`` into ``folder/package``."""
    config = yaml.safe_load(GENERATOR_CONFIG.read_text())
    config.update(post_hooks=[], package_name_override=package)
    config_file = folder / f"{package}-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--url",
         f"{url}/openapi.json", "--meta", "none", "--config", str(config_file),
         "--output-path", str(folder / package), "--fail-on-warning"],
        capture_output=True, text=True, timeout=300)
    if run.returncode != 0 or "WARNING" in run.stdout:
        raise AssertionError(f"openapi-python-client failed or warned:\n{run.stdout}{run.stderr}")
    return folder / package


@contextmanager
def generated_client(url: str, folder: Path,
                     package: str = "cgidm_generated_client") -> Iterator[ModuleType]:
    """The generated package, imported; removed from ``sys.modules`` afterwards."""
    root = generate(url, folder, package)
    spec = importlib.util.spec_from_file_location(package, root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]


def submodule(package: ModuleType, name: str) -> Any:
    """``package.name`` of a generated client (``api.jobs.authenticate``, ``models``)."""
    return importlib.import_module(f"{package.__name__}.{name}")


def wait_for_job(package: ModuleType, client: Any, job_id: str, timeout: float = 120) -> Any:
    """The job (the generated ``JobView``) once it ended, polled through the generated client;
    a job still running after ``timeout`` seconds is returned as it is (the caller's assert
    then fails instead of the test hanging)."""
    get_job = submodule(package, "api.jobs.get_job")
    job = get_job.sync(job_id, client=client)
    deadline = time.monotonic() + timeout
    while job.status.value not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        job = get_job.sync(job_id, client=client)
    return job
