"""Real servers for the service tests: Redis, an S3 server (moto), a Celery worker, the gateway.

Everything runs as separate processes talking over real sockets, configured only through the
``CGIDM_*`` variables, exactly as docker-compose runs them. Models are tiny random DDPM pairs in
a registry file, and jobs use a few PGD steps, so each job takes seconds on a CPU.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import tinymodels

REPO_ROOT = Path(__file__).resolve().parents[2]
BUCKET = "cgidm-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               proc: subprocess.Popen | None = None, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout} s\n{tail}")


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CGIDM_")}
    env.update(AWS_ENV)
    env.update({
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # two cores are shared by everything here
        "CGIDM_DEVICE": "cpu",
        "CGIDM_PROGRESS_INTERVAL": "0.2",
        "CGIDM_CANCEL_CHECK_INTERVAL": "0.1",
    })
    env.update(extra)
    return env


def start_logged(cmd: list[str], env: dict[str, str], log: Path, **kw: Any) -> subprocess.Popen:
    handle = log.open("wb")
    return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                            cwd=REPO_ROOT, **kw)


def png_bytes(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    """A deterministic noise picture (a stand-in for a user's image)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 90,
                 until: Callable[[dict], bool] | None = None) -> dict:
    until = until or (lambda job: job["status"] in TERMINAL)
    return wait_until(lambda: (lambda j: j if until(j) else None)(
        client.get(f"/jobs/{job_id}").json()), timeout, f"job {job_id}")


# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def service_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def registry_file(service_root: Path) -> Path:
    """A registry with two tiny pairs (ids tiny-base/tiny-ft and other-base/other-ft)."""
    pre, ft = tinymodels.make_tiny_ddpm_pair(service_root / "models", seed=0)
    pre2, ft2 = tinymodels.make_tiny_ddpm_pair(service_root / "models2", seed=1)
    entries = [
        {"id": "tiny-base", "family": "ddpm", "path": str(pre)},
        {"id": "tiny-ft", "family": "ddpm", "path": str(ft), "finetuned_from": "tiny-base"},
        {"id": "other-base", "family": "ddpm", "path": str(pre2)},
        {"id": "other-ft", "family": "ddpm", "path": str(ft2), "finetuned_from": "other-base"},
    ]
    path = service_root / "models.json"
    path.write_text(json.dumps({"models": entries}))
    return path


@pytest.fixture(scope="session")
def redis_url(service_root: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    port = free_port()
    log = service_root / "redis.log"
    proc = start_logged([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", str(service_root)], os.environ.copy(),
                        log)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    wait_until(client.ping, 20, "redis-server", proc, log)
    yield f"redis://127.0.0.1:{port}/0"
    stop_process(proc)


@pytest.fixture(scope="session")
def s3_endpoint(service_root: Path) -> Iterator[str]:
    port = free_port()
    log = service_root / "moto.log"
    proc = start_logged([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                        child_env({}), log)
    endpoint = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(endpoint, timeout=2).status_code < 500, 30, "moto server",
               proc, log)
    s3_client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    stop_process(proc)


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="session")
def service_env(service_root, redis_url, s3_endpoint, registry_file) -> dict[str, str]:
    """The production-like settings: Redis broker, S3 storage, a registry file."""
    return child_env({
        "CGIDM_BROKER_URL": redis_url,
        "CGIDM_STORAGE_URL": f"s3://{BUCKET}/svc",
        "CGIDM_S3_ENDPOINT_URL": s3_endpoint,
        "CGIDM_MODELS": str(registry_file),
        "CGIDM_DATA_DIR": str(service_root / "data"),
        "CGIDM_MAX_FILES": "6",
        "CGIDM_MAX_UPLOAD_BYTES": "200000",
        "CGIDM_MODEL_CACHE_BYTES": str(10 * 1024**2),
    })


@pytest.fixture(scope="session")
def worker(service_env, service_root) -> Iterator[subprocess.Popen]:
    log = service_root / "worker.log"
    proc = start_logged([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                         "--pool=solo", "-c", "1", "-l", "info"], service_env, log)
    wait_until(lambda: b"ready." in log.read_bytes(), 60, "celery worker", proc, log)
    yield proc
    stop_process(proc)


@pytest.fixture(scope="session")
def gateway_url(service_env, service_root) -> Iterator[str]:
    port = free_port()
    log = service_root / "gateway.log"
    proc = start_logged([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                         "--port", str(port)], service_env, log)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 30,
               "gateway", proc, log)
    yield url
    stop_process(proc)


@pytest.fixture(scope="session")
def client(gateway_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=30) as http:
        yield http


@pytest.fixture
def submit(client) -> Callable[..., httpx.Response]:
    """POST /authenticate with tiny-base/tiny-ft and generated images unless told otherwise."""

    def post(images: list[tuple[str, bytes]] | None = None,
             controls: list[tuple[str, bytes]] | None = None, **fields: Any) -> httpx.Response:
        data = {"pretrained": "tiny-base", "finetuned": "tiny-ft", "steps": "4", **fields}
        data = {k: str(v) for k, v in data.items() if v is not None}
        images = images if images is not None else [("a.png", png_bytes(1))]
        files = [("images", (n, b, "image/png")) for n, b in images]
        files += [("controls", (n, b, "image/png")) for n, b in controls or []]
        return client.post("/authenticate", data=data, files=files)

    return post
