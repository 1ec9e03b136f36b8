"""Real servers for the service tests: Redis, an S3 server (moto), a Celery worker, the gateway.

Everything runs as separate processes talking over real sockets, configured only through the
``CGIDM_*`` variables, exactly as docker-compose runs them. Models are tiny random DDPM pairs in
a registry file, and jobs use a few PGD steps, so each job takes seconds on a CPU.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.procs import (
    make_registry,
    png_bytes,
    stack_env,
    start_gateway,
    start_moto,
    start_redis,
    start_worker,
    stop_process,
)

# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def service_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def registry_file(service_root: Path) -> Path:
    """Tiny pairs tiny-base/tiny-ft and other-base/other-ft, plus two broken fine-tunes of
    tiny-base (missing-ft: folder gone; corrupt-ft: damaged safetensors)."""
    return make_registry(service_root)


@pytest.fixture(scope="session")
def redis_url(service_root: Path) -> Iterator[str]:
    try:
        proc, url = start_redis(service_root)
    except FileNotFoundError as exc:  # a missing real part is a failure, not a skip
        pytest.fail(f"{exc}: the service tests need redis-server; `make test` installs it "
                    "(Debian package redis-server)")
    yield url
    stop_process(proc)


@pytest.fixture(scope="session")
def s3_endpoint(service_root: Path) -> Iterator[str]:
    proc, endpoint = start_moto(service_root)
    yield endpoint
    stop_process(proc)


@pytest.fixture(scope="session")
def service_env(service_root, redis_url, s3_endpoint, registry_file) -> dict[str, str]:
    """The production-like settings: Redis broker, S3 storage, a registry file."""
    return stack_env(broker_url=redis_url, s3_endpoint=s3_endpoint, prefix="svc",
                     registry=registry_file, data_dir=service_root / "data", extra={
                         "CGIDM_MAX_FILES": "6",
                         "CGIDM_MAX_UPLOAD_BYTES": "200000",
                         "CGIDM_MAX_REQUEST_BYTES": "1500000",
                         "CGIDM_MAX_IMAGE_PIXELS": "4000000",
                         "CGIDM_MODEL_CACHE_BYTES": str(10 * 1024**2),
                     })


@pytest.fixture(scope="session")
def worker(service_env, service_root) -> Iterator[subprocess.Popen]:
    proc = start_worker(service_env, service_root / "worker.log")
    yield proc
    stop_process(proc)


@pytest.fixture(scope="session")
def gateway_url(service_env, service_root) -> Iterator[str]:
    proc, url = start_gateway(service_env, service_root / "gateway.log")
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
