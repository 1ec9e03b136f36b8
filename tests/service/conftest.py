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

from cgidm_testkit.processes import (
    make_registry,
    png_bytes,
    stack_env,
    start_gateway,
    start_moto,
    start_redis,
    start_worker,
    stop_process,
)
from tests.service.inprocess import LIMITS, gateway_in_process

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
                         **{f"CGIDM_{name.upper()}": str(value) for name, value in LIMITS.items()},
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
    return _poster(client)


def _poster(client: Any) -> Callable[..., httpx.Response]:
    def post(images: list[tuple[str, bytes]] | None = None,
             controls: list[tuple[str, bytes]] | None = None, **fields: Any) -> httpx.Response:
        data = {"pretrained": "tiny-base", "finetuned": "tiny-ft", "steps": "4", **fields}
        data = {k: str(v) for k, v in data.items() if v is not None}
        images = images if images is not None else [("a.png", png_bytes(1))]
        files = [("images", (n, b, "image/png")) for n, b in images]
        files += [("controls", (n, b, "image/png")) for n, b in controls or []]
        return client.post("/authenticate", data=data, files=files)

    return post


# ------------------------------------------------------------------------------------------
# the gateway in-process, for route tests where no real server is the point


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, registry_file) -> Iterator[Any]:
    """The gateway app through FastAPI's TestClient: embedded storage and broker in a temporary
    folder, the tiny registry, ``LIMITS``; requests come from 127.0.0.1 (local mode, no key).
    No worker runs, so jobs stay queued."""
    with gateway_in_process(tmp_path_factory.mktemp("app"), registry_file) as http:
        yield http


@pytest.fixture
def app_submit(app_client) -> Callable[..., Any]:
    """:func:`submit` against the in-process gateway."""
    return _poster(app_client)
