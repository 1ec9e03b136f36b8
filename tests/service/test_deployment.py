"""docker-compose.yml, the Dockerfiles and the docs agree with the code (no Docker needed).

`make compose-test` builds the images and runs the stack for real (scripts/compose_test.sh);
these tests keep the files honest without an engine."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from cgidm.job_queue import AUTHENTICATE_TASK
from cgidm.settings import Settings, setting_env_names
from cgidm_testkit.processes import REPO_ROOT, child_env, png_bytes, start_gateway, stop_process

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
#: Read with docker-compose.yml when no -f is given: the worker's GPU.
GPU_OVERRIDE = yaml.safe_load((REPO_ROOT / "docker-compose.override.yml").read_text())
CPU_OVERRIDE = yaml.safe_load((REPO_ROOT / "docker-compose.cpu.yml").read_text())
CI_OVERRIDE = yaml.safe_load((REPO_ROOT / "docker-compose.ci.yml").read_text())
CI_DOCKERFILES = {name: (REPO_ROOT / "docker" / "ci" / f"{name}.Dockerfile").read_text()
                  for name in ("redis", "s3")}
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
    assert "deploy" not in worker  # the GPU comes from docker-compose.override.yml
    devices = GPU_OVERRIDE["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert set(GPU_OVERRIDE["services"]["worker"]) == {"deploy"}
    hf_home = worker["environment"]["HF_HOME"]
    assert any(v.split(":")[1] == hf_home for v in worker["volumes"])
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"


def test_celery_app_path_in_compose_is_real():
    import worker.celery_app as module
    import worker.tasks  # noqa: F401 - registers the task

    assert AUTHENTICATE_TASK in module.app.tasks
    assert module.app.conf.task_acks_late and module.app.conf.worker_prefetch_multiplier == 1


def test_dockerfiles_keep_torch_out_of_the_gateway():
    assert re.search(r"^ARG BASE_IMAGE=python:[\d.]+-slim$", GATEWAY_DOCKERFILE, re.MULTILINE)
    instructions = "\n".join(line for line in GATEWAY_DOCKERFILE.splitlines()
                             if not line.lstrip().startswith("#"))
    assert "torch" not in instructions.lower()
    assert not any("torch" in r.lower() or "diffusers" in r.lower() for r in GATEWAY_REQUIREMENTS)
    assert "pip install --no-deps ." in GATEWAY_DOCKERFILE
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+-runtime\S*$", WORKER_DOCKERFILE,
                     re.MULTILINE)
    assert re.search(r'^ARG TORCH_SPEC="torch>=2.2,<3"$', WORKER_DOCKERFILE, re.MULTILINE)
    assert re.search(r'pip install --find-links /wheels --index-url "\$TORCH_INDEX_URL" '
                     r'"\$TORCH_SPEC"', WORKER_DOCKERFILE)
    for path in re.findall(r"^COPY (\S+) ", GATEWAY_DOCKERFILE + WORKER_DOCKERFILE, re.MULTILINE):
        if path != "README.md":  # written by the project's README task
            assert (REPO_ROOT / path).exists(), path


def test_ci_changes_only_what_its_network_forces():
    """docker-compose.ci.yml swaps the images CI cannot pull (Redis, MinIO and its `mc`) for
    local builds and leaves the gateway and the worker, the project's own images, as users get
    them; docker-compose.cpu.yml only switches the worker to the CPU."""
    assert set(CI_OVERRIDE["services"]) == {"redis", "minio", "create-bucket"}
    for name, service in CI_OVERRIDE["services"].items():
        assert set(service) <= {"image", "command", "entrypoint", "healthcheck"}, name
        assert service["image"].startswith("cgidm-ci-"), name
    assert CI_OVERRIDE["services"]["minio"]["command"][:1] == ["moto_server"]
    assert "--appendonly" in CI_OVERRIDE["services"]["redis"]["command"]
    bucket = re.search(r'create_bucket\(Bucket="([\w.-]+)"\)',
                       CI_OVERRIDE["services"]["create-bucket"]["command"][0]).group(1)
    assert _env("gateway")["CGIDM_STORAGE_URL"].startswith(f"s3://{bucket}/")
    assert CPU_OVERRIDE == {"services": {"worker": {"environment": {"CGIDM_DEVICE": "cpu"}}}}


def test_images_run_as_non_root_and_keep_the_build_secret_out():
    """Every Dockerfile ends as a non-root user; the CA bundle of a TLS-intercepting network
    reaches pip only as a build secret (a mount for one step), never COPYed into a layer."""
    for name, text in {"gateway": GATEWAY_DOCKERFILE, "worker": WORKER_DOCKERFILE,
                       **CI_DOCKERFILES}.items():
        users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), name
        assert re.search(r"^ARG BASE_IMAGE=\S+$", text, re.MULTILINE), name
        assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.MULTILINE), name
        for line in re.findall(r"^(?:COPY|ADD) .*$", text, re.MULTILINE):
            assert not re.search(r"\.(crt|pem)\b|ssl|cert", line), (name, line)
        for match in re.finditer(r"PIP_CERT=([^\s;]+)", text):
            assert match.group(1) == "/run/secrets/pip-cert", name
        if "pip install" in text:
            assert "--mount=type=secret,id=pip-cert" in text, name


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


# ------------------------------------------------------------------------------------------
# the gateway image: every command it offers runs with what the image installs, without torch

#: Installed in a child's ``sitecustomize`` (found through PYTHONPATH): any top-level module the
#: gateway image would not have fails to import, torch first among them.
GATEWAY_IMAGE_HOOK = '''
import importlib.abc
import sys

NOT_IN_IMAGE = frozenset({blocked!r})


class NotInGatewayImage(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in NOT_IN_IMAGE:
            raise ModuleNotFoundError(f"No module named {{fullname!r}} (not in the gateway "
                                      "image)", name=fullname)
        return None


sys.meta_path.insert(0, NotInGatewayImage())
'''


def _copied_packages() -> set[str]:
    """The project's top-level packages the gateway Dockerfile COPYs into the image."""
    copied = re.findall(r"^COPY (\S+) ", GATEWAY_DOCKERFILE, re.MULTILINE)
    return {path.rstrip("/") for path in copied if (REPO_ROOT / path / "__init__.py").is_file()}


def _not_in_gateway_image() -> set[str]:
    """Top-level modules installed here that the gateway image lacks: those of distributions
    outside its requirements' closure, and the project's packages its Dockerfile does not COPY."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    installed = _closure(GATEWAY_REQUIREMENTS)
    blocked = {
        module for module, dists in packages_distributions().items()
        if "cgidm" not in dists and not any(canonicalize_name(d) in installed for d in dists)
    }
    project = {p.name for p in REPO_ROOT.iterdir() if (p / "__init__.py").is_file()}
    return (blocked - project) | (project - _copied_packages())


@pytest.fixture(scope="module")
def gateway_image_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gateway-image")
    (root / "sitecustomize.py").write_text(
        GATEWAY_IMAGE_HOOK.format(blocked=sorted(_not_in_gateway_image())))
    return child_env({"PYTHONPATH": f"{root}:{REPO_ROOT}", "CGIDM_DATA_DIR": str(root / "data")})


def _cgidm(env: dict[str, str], *args: str, stdin: str | None = None
           ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cgidm.cli", *args], env=env, cwd=REPO_ROOT,
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_the_gateway_image_has_no_torch_and_its_packages(gateway_image_env):
    assert _copied_packages() == {"app", "cgidm", "cgidm_core"}
    probe = ("import importlib, json\nout = {}\nfor name in ('torch', 'numpy', 'diffusers', "
             "'worker', 'cgidm_core.names', 'fastapi', 'httpx', 'tqdm'):\n"
             "    try:\n        importlib.import_module(name); out[name] = True\n"
             "    except ModuleNotFoundError:\n        out[name] = False\nprint(json.dumps(out))")
    out = subprocess.run([sys.executable, "-c", probe], env=gateway_image_env, cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"torch": False, "numpy": False, "diffusers": False,
                                      "worker": False, "cgidm_core.names": True,
                                      "fastapi": True, "httpx": True, "tqdm": True}


def test_every_command_has_help_in_the_gateway_image(gateway_image_env):
    from cgidm.cli import COMMANDS

    for args in ([], *([name] for name in COMMANDS), ["keys", "new"], ["keys", "hash"]):
        run = _cgidm(gateway_image_env, *args, "--help")
        assert run.returncode == 0, (args, run.stderr)
        assert "usage: cgidm" in run.stdout


def test_keys_work_in_the_gateway_image(gateway_image_env):
    import hashlib

    made = _cgidm(gateway_image_env, "keys", "new", "alice")
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[1].strip()
    entry = f"alice:{hashlib.sha256(key.encode()).hexdigest()}"
    assert f"  {entry}" in made.stdout.splitlines()
    hashed = _cgidm(gateway_image_env, "keys", "hash", "alice", stdin=key)
    assert (hashed.returncode, hashed.stdout.strip()) == (0, entry)
    bad = _cgidm(gateway_image_env, "keys", "new", "not a name")
    assert bad.returncode == 2
    assert bad.stderr.startswith("cgidm: error: key name 'not a name'")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_models_lists_the_demo_models_in_the_gateway_image(gateway_image_env):
    from cgidm_core.names import DEMO_MODELS

    listed = _cgidm(gateway_image_env, "models", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [m["name"] for m in json.loads(listed.stdout)] == list(DEMO_MODELS)
    table = _cgidm(gateway_image_env, "models")
    assert table.returncode == 0 and "fine-tuned from demo-base" in table.stdout


def test_method_commands_say_in_one_line_that_they_need_torch(gateway_image_env, tmp_path):
    picture = tmp_path / "a.png"
    picture.write_bytes(png_bytes(0))
    for args in (["check", "--pretrained", "demo-base", "--finetuned", "demo-vangogh",
                  "--out", str(tmp_path / "out"), str(picture)],
                 ["eval", "--pretrained", "demo-base", "--finetuned", "demo-vangogh",
                  "--members", str(tmp_path), "--holdout", str(tmp_path)]):
        run = _cgidm(gateway_image_env, *args)
        assert run.returncode == 1, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and re.fullmatch(
            rf"cgidm: error: `cgidm {args[0]}` needs the Python package '(torch|numpy)', which "
            r"this installation lacks \(the gateway image has no torch\); run it where cgidm "
            "is installed with its dependencies", lines[0]), lines


@pytest.mark.slow  # starts the gateway
def test_submit_reaches_a_gateway_running_in_the_gateway_image(gateway_image_env, tmp_path):
    """The gateway itself and `cgidm submit` run with the image's packages only. No worker runs,
    so the job stays queued and submit gives up after --timeout, in one line."""
    made = _cgidm(gateway_image_env, "keys", "new", "alice")
    key, entry = made.stdout.splitlines()[1].strip(), made.stdout.splitlines()[3].strip()
    env = {**gateway_image_env, "CGIDM_API_KEYS": entry}
    proc, url = start_gateway(env, tmp_path / "gateway.log")
    try:
        picture = tmp_path / "a.png"
        picture.write_bytes(png_bytes(0))
        run = _cgidm(env, "submit", "--server", url, "--key", key, "--pretrained", "demo-base",
                     "--finetuned", "demo-vangogh", "--timeout", "1", "--out",
                     str(tmp_path / "out"), str(picture))
    finally:
        stop_process(proc)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("cgidm: error: job ") and "did not finish within 1 s" in last
