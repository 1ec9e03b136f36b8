"""``cgidm serve``: the same gateway and worker with no servers (local folder + SQLite broker)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cgidm_testkit.embedded import (
    as_background_job,
    as_foreground_job,
    job_file,
    running_past,
    start_serve,
    submit_tiny_job,
)
from cgidm_testkit.processes import (
    child_env,
    free_port,
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


def test_serve_runs_jobs_without_servers_and_requeues_on_ctrl_c(tmp_path, registry_file):
    data_dir = tmp_path / "data"
    env = child_env({"CGIDM_DATA_DIR": str(data_dir), "CGIDM_MODELS": str(registry_file)})
    port = free_port()
    # Started as a background job would be, with SIGINT ignored: Ctrl-C must still stop it.
    serve = start_serve(tmp_path, env, port, "serve1", sigint=as_background_job)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            job_id = submit_tiny_job(client, steps=4)
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
            long_job = submit_tiny_job(client, steps=10_000, batch_size="1")
            first = wait_for_job(client, long_job, timeout=180, until=running_past(0))
            assert (first["status"], first["attempts"]) == ("running", 1), first
            assert first["progress"]["steps_total"] == 20_000
            moved = wait_for_job(client, long_job, timeout=180,
                                 until=running_past(first["progress"]["steps_done"]))
            assert moved["status"] == "running", moved
            assert moved["progress"]["steps_done"] < moved["progress"]["steps_total"]

        # Ctrl-C while it runs: serve stops the gateway and the worker, and the worker puts
        # the job back in the queue (docs/SERVICE.md, "Late acks").
        children = set(_service_pids(data_dir)) - {serve.pid}
        assert len(children) == 2  # the gateway and the worker
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=120) == 0
        assert _service_pids(data_dir) == []
        record = job_file(data_dir, long_job)
        assert (record["status"], record["attempts"], record["progress"]["steps_done"]) == \
            ("queued", 1, 0), record
    finally:
        stop_process(serve)

    # The next start runs it again, from the start.
    serve = start_serve(tmp_path, env, port, "serve2")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            again = wait_for_job(client, long_job, timeout=180, until=running_past(0))
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
        preexec_fn=as_foreground_job)
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
