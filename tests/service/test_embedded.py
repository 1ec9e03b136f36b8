"""``cgidm serve``: the same gateway and worker with no servers (local folder + SQLite broker)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

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

pytestmark = pytest.mark.slow  # starts servers and processes


def _service_pids(data_dir: Path) -> list[int]:
    """Processes whose environment names this test's data folder (gateway and worker)."""
    marker = f"CGIDM_DATA_DIR={data_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _as_background_job() -> None:
    """SIGINT as a shell without job control leaves it for a command started with ``&`` (and for
    everything that command starts, a backgrounded ``make test`` included): ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_foreground_job() -> None:
    """SIGINT as a terminal leaves it: the default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _serve(tmp_path: Path, env: dict[str, str], port: int, name: str,
           sigint: Callable[[], None] = _as_foreground_job) -> subprocess.Popen:
    """``cgidm serve``, started with SIGINT as ``sigint`` sets it, whatever the test runner has."""
    log = tmp_path / f"{name}.log"
    proc = start_logged([sys.executable, "-m", "cgidm.cli", "serve", "--port", str(port)],
                        env, log, preexec_fn=sigint)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 90,
               "cgidm serve", proc, log)
    return proc


def _submit(client: httpx.Client, steps: int, **fields: str) -> str:
    response = client.post(
        "/authenticate", data={"pretrained": "tiny-base", "finetuned": "tiny-ft",
                               "steps": str(steps), **fields},
        files=[("images", ("x.png", png_bytes(5), "image/png")),
               ("controls", ("y.png", png_bytes(6), "image/png"))])
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def _job_file(data_dir: Path, job_id: str) -> dict:
    return json.loads((data_dir / "storage" / "jobs" / job_id / "job.json").read_text())


def _running_past(steps: int) -> Callable[[dict], bool]:
    """Until the job has run more than ``steps`` steps, or has ended (then the asserts say how)."""
    return lambda job: job["status"] in TERMINAL or (
        job["status"] == "running" and job["progress"]["steps_done"] > steps)


def test_serve_runs_jobs_without_servers_and_requeues_on_ctrl_c(tmp_path, registry_file):
    data_dir = tmp_path / "data"
    env = child_env({"CGIDM_DATA_DIR": str(data_dir), "CGIDM_MODELS": str(registry_file)})
    port = free_port()
    # Started as a background job would be, with SIGINT ignored: Ctrl-C must still stop it.
    serve = _serve(tmp_path, env, port, "serve1", sigint=_as_background_job)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            job_id = _submit(client, steps=4)
            job = wait_for_job(client, job_id)
            assert job["status"] == "succeeded", job
            assert f"open http://127.0.0.1:{port}/ in a browser" in \
                (tmp_path / "serve1.log").read_text()
            stored = json.loads((data_dir / "storage" / "jobs" / job_id / "result.json")
                                .read_text())
            assert stored == job["result"]
            assert client.get(job["result"]["images"][0]["artifacts"]["partial"]).content \
                .startswith(b"\x89PNG")
            assert (data_dir / "broker.sqlite").is_file()

            # A long job (two batches of the most steps allowed: minutes even on a fast CPU) is
            # seen running through the gateway, its progress moving.
            long_job = _submit(client, steps=10_000, batch_size="1")
            first = wait_for_job(client, long_job, timeout=180, until=_running_past(0))
            assert (first["status"], first["attempts"]) == ("running", 1), first
            assert first["progress"]["steps_total"] == 20_000
            moved = wait_for_job(client, long_job, timeout=180,
                                 until=_running_past(first["progress"]["steps_done"]))
            assert moved["status"] == "running", moved
            assert moved["progress"]["steps_done"] < moved["progress"]["steps_total"]

        # Ctrl-C while it runs: serve stops the gateway and the worker, and the worker puts
        # the job back in the queue (docs/SERVICE.md, "Late acks").
        children = set(_service_pids(data_dir)) - {serve.pid}
        assert len(children) == 2  # the gateway and the worker
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=120) == 0
        assert _service_pids(data_dir) == []
        record = _job_file(data_dir, long_job)
        assert (record["status"], record["attempts"], record["progress"]["steps_done"]) == \
            ("queued", 1, 0), record
    finally:
        stop_process(serve)

    # The next start runs it again, from the start.
    serve = _serve(tmp_path, env, port, "serve2")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            again = wait_for_job(client, long_job, timeout=180, until=_running_past(0))
            assert (again["status"], again["attempts"]) == ("running", 2), again
            assert client.delete(f"/jobs/{long_job}").status_code == 202
            assert wait_for_job(client, long_job)["status"] == "cancelled"
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=120) == 0
        assert _service_pids(data_dir) == []
    finally:
        stop_process(serve)


def test_serve_reports_a_busy_port_and_stops_its_worker(tmp_path):
    import socket

    data_dir = tmp_path / "data"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "cgidm.cli", "serve", "--port", str(port)],
            env=child_env({"CGIDM_DATA_DIR": str(data_dir)}), capture_output=True, text=True,
            timeout=120)
    assert out.returncode == 1
    assert "cgidm: error: the gateway process exited" in out.stderr
    assert _service_pids(data_dir) == []


def test_demo_command_end_to_end(tmp_path):
    """``cgidm demo`` with few steps: real data, the packaged demo pair, the real HTTP path."""
    from tests.paths import SHARED_DATA, require_shared_data

    require_shared_data("wikiart-vangogh", "membership")
    out_dir = tmp_path / "out"
    log = tmp_path / "demo.log"
    # --keep-serving: the job's web page stays up after the result, until Ctrl-C.
    demo = start_logged(
        [sys.executable, "-m", "cgidm.cli", "demo", "--steps", "2", "--out", str(out_dir),
         "--data", str(SHARED_DATA), "--keep-serving"], child_env({}), log,
        preexec_fn=_as_foreground_job)
    try:
        page = wait_until(lambda: re.search(r"the evidence page is (http://127\.0\.0\.1:\d+)"
                                            r"/checks/([0-9a-f]{32})", log.read_text()),
                          300, "the demo's result", demo, log)
        base, job_id = page.group(1), page.group(2)
        assert f"watch it in a browser: {base}/checks/{job_id}" in log.read_text()
        assert httpx.get(f"{base}/checks/{job_id}", timeout=10).status_code == 200
        evidence = httpx.get(f"{base}/jobs/{job_id}/evidence.html", timeout=30).text
        assert evidence.count('data-verdict="control"') == 10
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
    finally:
        stop_process(demo)
    out = subprocess.CompletedProcess(demo.args, 0, log.read_text(), "")
    assert "Set-level test (one-sided Mann-Whitney U" in out.stdout
    assert sorted(p.name for p in (out_dir / "images").iterdir()) == sorted(
        p.stem + ".png" for p in (SHARED_DATA / "wikiart-vangogh" / "membership").iterdir())
    assert len(list((out_dir / "controls").glob("*.png"))) == 10
    result = json.loads((out_dir / "result.json").read_text())
    # 10 controls cannot reach alpha = 0.05 (1/11 > 0.05): per-image verdicts are inconclusive.
    assert all(row["verdict"] == "inconclusive" for row in result["images"])
    assert not (tmp_path / "cgidm-data").exists()  # the demo keeps its service data private


def test_serve_started_again_after_its_worker_was_killed_runs_the_job_again(tmp_path,
                                                                            registry_file):
    """The embedded service's leases (a SQLite file next to the broker's): a worker SIGKILLed
    mid-job stops ``cgidm serve``; started again on the same data folder, its reapers find the
    lapsed lease (default settings: 60 s) and the job runs again, once."""
    import time

    data_dir = tmp_path / "data"
    env = child_env({"CGIDM_DATA_DIR": str(data_dir), "CGIDM_MODELS": str(registry_file)})
    port = free_port()
    serve = _serve(tmp_path, env, port, "serve-killed")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            job_id = _submit(client, steps=120)
            running = wait_for_job(client, job_id, timeout=180, until=_running_past(0))
            assert running["status"] == "running", running
        worker_pid = int(running["worker"]["worker_id"].rsplit("-", 1)[1])
        os.kill(worker_pid, signal.SIGKILL)
        killed = time.monotonic()
        assert serve.wait(timeout=60) == 1  # serve stops when a child dies
    finally:
        stop_process(serve)
    assert _job_file(data_dir, job_id)["status"] == "running"  # stale, as the worker left it
    assert (data_dir / "leases.sqlite").is_file()

    serve = _serve(tmp_path, env, port, "serve-again")
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
