"""Starting the service's real processes: Redis, an S3 server (moto), Celery workers, the gateway.

Shared by the pytest fixtures (conftest.py) and ``benchmarks/load.py``, so the load test runs
exactly the stack the tests run. Everything listens on 127.0.0.1 and is configured only through
``CGIDM_*`` variables, as docker-compose configures it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
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
               proc: subprocess.Popen | None = None, log: Path | None = None,
               interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(interval)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout} s\n{tail}")


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_process(proc: subprocess.Popen) -> None:
    """SIGKILL: no clean-up, no acknowledgement, as when the OOM killer strikes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
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
    handle = log.open("ab")
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
# servers


def start_redis(root: Path, port: int | None = None, appendonly: bool = False,
                name: str = "redis") -> tuple[subprocess.Popen, str]:
    """redis-server on 127.0.0.1; with ``appendonly`` its data survives a restart (or SIGKILL)
    from the append-only file in ``root``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (make system-deps installs it)")
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{name}.log"
    proc = start_logged([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "yes" if appendonly else "no",
                         "--appendfsync", "everysec", "--dir", str(root)], os.environ.copy(),
                        log)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    wait_until(client.ping, 20, "redis-server", proc, log)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def start_moto(root: Path, port: int | None = None, bucket: str | None = BUCKET,
               name: str = "moto") -> tuple[subprocess.Popen, str]:
    """An S3 server (moto, in memory: a restart starts empty) with ``bucket`` created."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{name}.log"
    proc = start_logged([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                        child_env({}), log)
    endpoint = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(endpoint, timeout=2).status_code < 500, 30, "moto server",
               proc, log)
    if bucket:
        s3_client(endpoint).create_bucket(Bucket=bucket)
    return proc, endpoint


def launch_worker(env: dict[str, str], log: Path, node: str | None = None) -> subprocess.Popen:
    """A Celery worker process, not waited for (see :func:`wait_worker_ready`), so that several
    can start at once. ``node`` names it (``-n``); several on one host need distinct names."""
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=solo",
           "-c", "1", "-l", "info"]
    if node:
        cmd += ["-n", node]
    return start_logged(cmd, env, log)


def wait_worker_ready(proc: subprocess.Popen, log: Path, timeout: float = 90,
                      start: int = 0) -> None:
    """Until the worker logs "ready." (after byte ``start`` of its log, for a restarted one)."""
    wait_until(lambda: b"ready." in log.read_bytes()[start:], timeout, "celery worker", proc,
               log)


def start_worker(env: dict[str, str], log: Path, timeout: float = 90) -> subprocess.Popen:
    start = log.stat().st_size if log.exists() else 0
    proc = launch_worker(env, log)
    wait_worker_ready(proc, log, timeout, start)
    return proc


def start_gateway(env: dict[str, str], log: Path, port: int | None = None,
                  extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    proc = start_logged([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                         "--port", str(port), *extra_args], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 60,
               "gateway", proc, log)
    return proc, url


def stack_env(*, broker_url: str, s3_endpoint: str, prefix: str, registry: Path,
              data_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Settings for a gateway or worker of one stack: its broker, its storage (``prefix`` in the
    test bucket, so stacks sharing one S3 server keep apart), its registry and data folder.

    Every stack needs these five; building them here keeps the test stacks and the load
    benchmark configured alike. ``extra`` adds or overrides ``CGIDM_*`` settings.
    """
    return child_env({
        "CGIDM_BROKER_URL": broker_url,
        "CGIDM_STORAGE_URL": f"s3://{BUCKET}/{prefix}",
        "CGIDM_S3_ENDPOINT_URL": s3_endpoint,
        "CGIDM_MODELS": str(registry),
        "CGIDM_DATA_DIR": str(data_dir),
        **(extra or {}),
    })


def url_port(url: str) -> int:
    """The port of a ``redis://`` or ``http://`` URL a start_* helper returned, to start a
    server again where its clients already point."""
    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"no port in {url!r}")
    return port


def make_registry(root: Path) -> Path:
    """A registry with two tiny pairs (tiny-base/tiny-ft, other-base/other-ft) and two broken
    fine-tunes of tiny-base: one whose folder is missing, one whose weights are corrupt."""
    from cgidm_testkit import tinymodels

    pre, ft = tinymodels.make_tiny_ddpm_pair(root / "models", seed=0)
    pre2, ft2 = tinymodels.make_tiny_ddpm_pair(root / "models2", seed=1)
    corrupt = root / "models" / "corrupt_finetuned"
    shutil.copytree(ft, corrupt, dirs_exist_ok=True)
    weights = next(corrupt.rglob("*.safetensors"))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    entries = [
        {"id": "tiny-base", "family": "ddpm", "path": str(pre)},
        {"id": "tiny-ft", "family": "ddpm", "path": str(ft), "finetuned_from": "tiny-base"},
        {"id": "other-base", "family": "ddpm", "path": str(pre2)},
        {"id": "other-ft", "family": "ddpm", "path": str(ft2), "finetuned_from": "other-base"},
        {"id": "missing-ft", "family": "ddpm", "path": str(root / "models" / "deleted"),
         "finetuned_from": "tiny-base"},
        {"id": "corrupt-ft", "family": "ddpm", "path": str(corrupt),
         "finetuned_from": "tiny-base"},
    ]
    path = root / "models.json"
    path.write_text(json.dumps({"models": entries}))
    return path


def bucket_keys(endpoint: str, prefix: str) -> list[str]:
    """Every key under ``prefix`` in the test bucket."""
    client = s3_client(endpoint)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


def send_unfinished_chunked(url: str, head: str, body_chunks: Iterable[bytes],
                            until: bytes | None = None) -> tuple[bytes, int]:
    """Send a chunked request whose body is never finished; return (response, body bytes sent
    before it arrived), so a response proves the server answered mid-stream. The response is
    read until the server closes the connection, or until ``until`` has arrived."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        sock.settimeout(0.05)
        response = b""
        for chunk in body_chunks:
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                response += sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                continue
            if response:
                break
        sock.settimeout(10)
        while until is None or until not in response:
            try:
                more = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not more:
                break
            response += more
    return response, sent
