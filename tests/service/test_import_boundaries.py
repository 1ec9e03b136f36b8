"""The gateway never imports torch; the shared package imports neither torch nor FastAPI."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.service.conftest import REPO_ROOT, child_env

PROBE = """
import json, sys
for name in {modules!r}:
    __import__(name)
print(json.dumps(sorted(m for m in ("torch", "cgidm_core", "fastapi", "diffusers", "numpy")
                        if m in sys.modules)))
"""


def _imported(*modules: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(modules=list(modules))],
                         env=child_env({}), cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gateway_does_not_import_torch():
    loaded = _imported("app.main")
    assert "torch" not in loaded and "cgidm_core" not in loaded and "diffusers" not in loaded
    assert "fastapi" in loaded  # the probe itself works


def test_shared_package_imports_neither_torch_nor_fastapi():
    loaded = _imported("cgidm.settings", "cgidm.storage", "cgidm.jobs", "cgidm.registry",
                       "cgidm.tasks", "cgidm.cli", "cgidm.model_files", "cgidm.uploaded_models",
                       "cgidm.client", "cgidm.commands.submit", "cgidm.commands.report")
    assert "torch" not in loaded and "fastapi" not in loaded and "cgidm_core" not in loaded


def test_worker_app_loads_torch_only_when_a_job_runs():
    assert "torch" not in _imported("worker.celery_app", "worker.tasks")
