"""``cgidm serve`` in tests: start it as a shell would, submit the tiny pair's job, read its
files; and the scenario of a worker killed mid-job under it, which mostly waits out the default
60 s lease and so runs beside the other worker-loss scenarios (tests/service/test_worker_loss.py)
rather than alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from cgidm_testkit.processes import (
    TERMINAL,
    child_env,
    free_port,
    png_bytes,
    start_logged,
    stop_process,
    wait_for_job,
    wait_until,
)


def as_background_job() -> None:
    """SIGINT as a shell without job control leaves it for a command started with ``&`` (and for
    everything that command starts, a backgrounded ``make test`` included): ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def as_foreground_job() -> None:
    """SIGINT as a terminal leaves it: the default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_serve(tmp_path: Path, env: dict[str, str], port: int, name: str,
           sigint: Callable[[], None] = as_foreground_job) -> subprocess.Popen:
    """``cgidm serve``, started with SIGINT as ``sigint`` sets it, whatever the test runner has."""
    log = tmp_path / f"{name}.log"
    proc = start_logged([sys.executable, "-m", "cgidm.cli", "serve", "--port", str(port)],
                        env, log, preexec_fn=sigint)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 90,
               "cgidm serve", proc, log)
    return proc


def submit_tiny_job(client: httpx.Client, steps: int, **fields: str) -> str:
    response = client.post(
        "/authenticate", data={"pretrained": "tiny-base", "finetuned": "tiny-ft",
                               "steps": str(steps), **fields},
        files=[("images", ("x.png", png_bytes(5), "image/png")),
               ("controls", ("y.png", png_bytes(6), "image/png"))])
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def job_file(data_dir: Path, job_id: str) -> dict:
    return json.loads((data_dir / "storage" / "jobs" / job_id / "job.json").read_text())


def running_past(steps: int) -> Callable[[dict], bool]:
    """Until the job has run more than ``steps`` steps, or has ended (then the asserts say how)."""
    return lambda job: job["status"] in TERMINAL or (
        job["status"] == "running" and job["progress"]["steps_done"] > steps)


def killed_worker_then_serve_again(tmp_path: Path, registry_file: Path) -> None:
    """The embedded service's leases (a SQLite file next to the broker's): a worker SIGKILLed
    mid-job stops ``cgidm serve``; started again on the same data folder, its reapers find the
    lapsed lease (default settings: 60 s) and the job runs again, once."""
    data_dir = tmp_path / "data"
    env = child_env({"CGIDM_DATA_DIR": str(data_dir), "CGIDM_MODELS": str(registry_file)})
    port = free_port()
    serve = start_serve(tmp_path, env, port, "serve-killed")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            job_id = submit_tiny_job(client, steps=120)
            running = wait_for_job(client, job_id, timeout=180, until=running_past(0))
            assert running["status"] == "running", running
        worker_pid = int(running["worker"]["worker_id"].rsplit("-", 1)[1])
        os.kill(worker_pid, signal.SIGKILL)
        killed = time.monotonic()
        assert serve.wait(timeout=60) == 1  # serve stops when a child dies
    finally:
        stop_process(serve)
    assert job_file(data_dir, job_id)["status"] == "running"  # stale, as the worker left it
    assert (data_dir / "leases.sqlite").is_file()

    serve = start_serve(tmp_path, env, port, "serve-again")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            job = wait_for_job(client, job_id, timeout=150)
            elapsed = time.monotonic() - killed
            assert job["status"] == "succeeded", job
            assert job["attempts"] == 2 and job["recovery"]["attempt"] == 2
            assert job["worker"]["delivery"] == 2
            assert elapsed < 120, elapsed
            print(f"\n[embedded] SIGKILL -> succeeded after a restart: {elapsed:.1f} s")
        folder = data_dir / "storage" / "jobs" / job_id
        assert [p.name for p in (folder / "attempts").iterdir()] == [job["attempt"]]
        assert json.loads((folder / "result.json").read_text()) == job["result"]
    finally:
        stop_process(serve)
