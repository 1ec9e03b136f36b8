"""The gateway never imports torch; the shared package imports neither torch nor FastAPI; of the
method library both import only its torch-free vocabulary, and ``import cgidm_core`` is cheap."""

from __future__ import annotations

import json
import subprocess
import sys

from cgidm_testkit.processes import REPO_ROOT, child_env

PROBE = """
import json, sys
for name in {modules!r}:
    __import__(name)
print(json.dumps(sorted(m for m in sys.modules
                        if m in ("torch", "fastapi", "diffusers", "numpy", "PIL")
                        or m.startswith("cgidm_core"))))
"""

#: What the gateway and the shared package may load of ``cgidm_core``: no module of it imports
#: anything but the standard library (``demo`` finds the packaged folders for ``cgidm models``;
#: ``key_signatures`` holds the tensor-name rules the upload check shares with the library;
#: ``inversion_config`` the one InversionConfig and its presets, shared with the job schema;
#: ``families`` is the family registry the upload check and ``cgidm models --families`` read).
TORCH_FREE_CORE = {"cgidm_core", "cgidm_core.names", "cgidm_core.errors", "cgidm_core.demo",
                   "cgidm_core.key_signatures", "cgidm_core.inversion_config",
                   "cgidm_core.families", "cgidm_core.family_evidence"}


def _imported(*modules: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(modules=list(modules))],
                         env=child_env({}), cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_library_loads_no_torch():
    assert _imported("cgidm_core", *TORCH_FREE_CORE) == TORCH_FREE_CORE


def test_the_library_loads_torch_when_a_public_name_is_used():
    loaded = _imported("cgidm_core")
    assert "torch" not in loaded
    out = subprocess.run([sys.executable, "-c", "import sys, cgidm_core\n"
                          "print(cgidm_core.ModelPair.__module__, 'torch' in sys.modules)"],
                         env=child_env({}), cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["cgidm_core.pair", "True"]


def test_the_inversion_settings_load_no_torch():
    """The gateway validates and shows the same InversionConfig the library runs."""
    out = subprocess.run([sys.executable, "-c", "import sys, cgidm_core\n"
                          "print(cgidm_core.InversionConfig.__module__, 'torch' in sys.modules)"],
                         env=child_env({}), cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["cgidm_core.inversion_config", "False"]


def test_gateway_does_not_import_torch():
    loaded = _imported("app.main")
    assert "torch" not in loaded and "diffusers" not in loaded and "numpy" not in loaded
    assert {m for m in loaded if m.startswith("cgidm_core")} <= TORCH_FREE_CORE
    assert "fastapi" in loaded  # the probe itself works


def test_shared_package_imports_neither_torch_nor_fastapi():
    loaded = _imported("cgidm.settings", "cgidm.storage", "cgidm.jobs", "cgidm.registry",
                       "cgidm.job_queue", "cgidm.cli", "cgidm.model_files", "cgidm.uploaded_models",
                       "cgidm.client", "cgidm.commands.submit", "cgidm.commands.report")
    assert "torch" not in loaded and "fastapi" not in loaded
    assert {m for m in loaded if m.startswith("cgidm_core")} <= TORCH_FREE_CORE


def test_worker_app_loads_torch_only_when_a_job_runs():
    assert "torch" not in _imported("worker.celery_app", "worker.tasks")
