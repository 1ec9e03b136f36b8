"""docker-compose.yml, the Dockerfiles and the docs agree with the code (no Docker needed)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from cgidm.settings import Settings, setting_env_names
from cgidm.tasks import AUTHENTICATE_TASK
from tests.service.conftest import REPO_ROOT, child_env

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
GATEWAY_DOCKERFILE = (REPO_ROOT / "docker" / "gateway.Dockerfile").read_text()
WORKER_DOCKERFILE = (REPO_ROOT / "docker" / "worker.Dockerfile").read_text()
GATEWAY_REQUIREMENTS = [
    line.strip() for line in (REPO_ROOT / "docker" / "gateway-requirements.txt").read_text()
    .splitlines() if line.strip() and not line.startswith("#")
]
_DEFAULT = re.compile(r"^\$\{(\w+):-(.*)\}$")


def _env(service: str) -> dict[str, str]:
    """A service's environment with ``${VAR:-default}`` replaced by its default."""
    env = SERVICES[service].get("environment", {})
    out = {}
    for key, value in env.items():
        match = _DEFAULT.match(str(value))
        out[key] = match.group(2) if match else str(value)
    return out


def _command(service: str) -> list[str]:
    command = SERVICES[service]["command"]
    return command if isinstance(command, list) else shlex.split(command)


def _dockerfile_cmd(text: str) -> list[str]:
    return json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))


def test_services_and_dependencies():
    assert set(SERVICES) == {"redis", "minio", "create-bucket", "gateway", "worker"}
    for name in ("gateway", "worker"):
        depends = SERVICES[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["minio"]["condition"] == "service_healthy"
        assert depends["create-bucket"]["condition"] == "service_completed_successfully"
    for name in ("redis", "minio", "gateway", "worker"):
        assert SERVICES[name]["healthcheck"]["test"], name


def test_redis_is_durable_and_minio_bucket_matches_storage_url():
    assert "--appendonly" in SERVICES["redis"]["command"]
    assert SERVICES["redis"]["command"][SERVICES["redis"]["command"].index("--appendonly") + 1] \
        == "yes"
    assert any(v.endswith(":/data") for v in SERVICES["redis"]["volumes"])
    bucket_command = " ".join(_command("create-bucket"))
    made = re.search(r"mc mb --ignore-existing local/([\w.-]+)", bucket_command).group(1)
    for name in ("gateway", "worker"):
        env = _env(name)
        assert env["CGIDM_STORAGE_URL"].startswith(f"s3://{made}/")
        assert env["CGIDM_BROKER_URL"].startswith("redis://redis:")
        assert env["CGIDM_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]


def test_compose_uses_only_real_setting_names_and_valid_values():
    names = setting_env_names()
    for name in ("gateway", "worker"):
        env = _env(name)
        used = {k for k in env if k.startswith("CGIDM_")}
        assert used <= names, used - names
        values = {k[len("CGIDM_"):].lower(): v for k, v in env.items() if k in used}
        settings = Settings(**values)  # every default in the file is a valid setting
        assert not settings.embedded_broker and settings.models is None


def test_gateway_service_runs_the_asgi_app_on_port_8000():
    gateway = SERVICES["gateway"]
    assert "8000:8000" in gateway["ports"]
    command = _command("gateway")
    assert command[:2] == ["uvicorn", "app.main:app"]
    assert command[command.index("--port") + 1] == "8000"
    assert _dockerfile_cmd(GATEWAY_DOCKERFILE)[:2] == ["uvicorn", "app.main:app"]
    assert gateway["build"]["dockerfile"] == "docker/gateway.Dockerfile"


def test_worker_service_runs_the_celery_app_with_a_gpu():
    worker = SERVICES["worker"]
    command = _command("worker")
    assert command[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert "--pool=solo" in command
    assert _dockerfile_cmd(WORKER_DOCKERFILE) == command
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    hf_home = worker["environment"]["HF_HOME"]
    assert any(v.split(":")[1] == hf_home for v in worker["volumes"])
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"


def test_celery_app_path_in_compose_is_real():
    import worker.celery_app as module
    import worker.tasks  # noqa: F401 - registers the task

    assert AUTHENTICATE_TASK in module.app.tasks
    assert module.app.conf.task_acks_late and module.app.conf.worker_prefetch_multiplier == 1


def test_dockerfiles_keep_torch_out_of_the_gateway():
    assert re.search(r"^FROM python:[\d.]+-slim", GATEWAY_DOCKERFILE, re.MULTILINE)
    instructions = "\n".join(line for line in GATEWAY_DOCKERFILE.splitlines()
                             if not line.lstrip().startswith("#"))
    assert "torch" not in instructions.lower()
    assert not any("torch" in r.lower() or "diffusers" in r.lower() for r in GATEWAY_REQUIREMENTS)
    assert "pip install --no-deps ." in GATEWAY_DOCKERFILE
    assert "COPY cgidm_core" not in GATEWAY_DOCKERFILE
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime", WORKER_DOCKERFILE, re.MULTILINE)
    assert re.search(r'pip install --index-url "\$TORCH_INDEX_URL" "torch', WORKER_DOCKERFILE)
    for path in re.findall(r"^COPY (\S+) ", GATEWAY_DOCKERFILE + WORKER_DOCKERFILE, re.MULTILINE):
        if path != "README.md":  # written by the project's README task
            assert (REPO_ROOT / path).exists(), path


PROBE = """
import json, os, sys
from importlib.metadata import packages_distributions
os.environ.update(CGIDM_STORAGE_URL="s3://bucket/prefix", CGIDM_BROKER_URL="redis://127.0.0.1:1/0")
import app.main
from kombu import Connection
for url in ("redis://127.0.0.1:1/0", "sqla+sqlite:////tmp/unused.sqlite"):
    Connection(url).transport  # loads the transport module (and its client library)
dists = packages_distributions()
top = {name.split(".")[0] for name in sys.modules} - set(sys.stdlib_module_names)
print(json.dumps(sorted({d for name in top for d in dists.get(name, [])})))
"""


def _closure(requirements: list[str]) -> set[str]:
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        try:
            requires = distribution(req.name).requires or []
        except PackageNotFoundError:
            continue
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e})
                                         for e in (*req.extras, "")):
                stack.append(sub)
    return names


#: Imported here but optional in the image (each import sits in a try/except ImportError):
#: setuptools' ``_distutils_hack`` comes from a .pth file at interpreter start; billiard tries
#: cffi (falls back to ctypes), botocore tries certifi (has its own CA bundle), redis-py tries
#: cryptography, anyio tries sniffio (here because selenium's trio needs it).
OPTIONAL_IMPORTS = {"setuptools", "cffi", "certifi", "cryptography", "sniffio"}


def test_gateway_requirements_cover_every_module_the_gateway_imports():
    from packaging.utils import canonicalize_name

    out = subprocess.run([sys.executable, "-c", PROBE], env=child_env({}), cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    imported = {canonicalize_name(d) for d in json.loads(out.stdout.strip().splitlines()[-1])}
    # "cgidm" itself: the image installs the project (pip install --no-deps .); an editable
    # install here maps app/ and cgidm/ to that distribution.
    missing = imported - _closure(GATEWAY_REQUIREMENTS) - OPTIONAL_IMPORTS - {"cgidm"}
    assert not missing, f"gateway imports packages its image would not install: {missing}"
    assert "torch" not in imported


@pytest.mark.parametrize("doc", ["docs/SERVICE.md"])
def test_every_setting_is_documented(doc):
    text = (REPO_ROOT / doc).read_text()
    documented = set(re.findall(r"^\| `(CGIDM_\w+)`", text, re.MULTILINE))
    assert documented == setting_env_names()
