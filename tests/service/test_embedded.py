"""``cgidm serve``: the same gateway and worker with no servers (local folder + SQLite broker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import (
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


def _serve(tmp_path: Path, env: dict[str, str], port: int, name: str) -> subprocess.Popen:
    log = tmp_path / f"{name}.log"
    proc = start_logged([sys.executable, "-m", "cgidm.cli", "serve", "--port", str(port)],
                        env, log)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 90,
               "cgidm serve", proc, log)
    return proc


def _submit(client: httpx.Client, steps: int) -> str:
    response = client.post(
        "/authenticate", data={"pretrained": "tiny-base", "finetuned": "tiny-ft",
                               "steps": str(steps)},
        files=[("images", ("x.png", png_bytes(5), "image/png")),
               ("controls", ("y.png", png_bytes(6), "image/png"))])
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def test_serve_runs_jobs_without_servers(tmp_path, registry_file):
    data_dir = tmp_path / "data"
    env = child_env({"CGIDM_DATA_DIR": str(data_dir), "CGIDM_MODELS": str(registry_file)})
    port = free_port()
    serve = _serve(tmp_path, env, port, "serve1")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            job_id = _submit(client, steps=4)
            job = wait_for_job(client, job_id)
            assert job["status"] == "succeeded", job
            stored = json.loads((data_dir / "storage" / "jobs" / job_id / "result.json")
                                .read_text())
            assert stored == job["result"]
            assert client.get(job["result"]["images"][0]["artifacts"]["partial"]).content \
                .startswith(b"\x89PNG")
            assert (data_dir / "broker.sqlite").is_file()

    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=120)
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
    from tests.paths import SHARED_DATA

    if not (SHARED_DATA / "wikiart-vangogh" / "membership").is_dir():
        pytest.skip(f"demo images not found under {SHARED_DATA}")
    out_dir = tmp_path / "out"
    out = subprocess.run(
        [sys.executable, "-m", "cgidm.cli", "demo", "--steps", "2", "--out", str(out_dir),
         "--data", str(SHARED_DATA)],
        env=child_env({}), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Set-level test (one-sided Mann-Whitney U" in out.stdout
    assert sorted(p.name for p in (out_dir / "images").iterdir()) == sorted(
        p.stem + ".png" for p in (SHARED_DATA / "wikiart-vangogh" / "membership").iterdir())
    assert len(list((out_dir / "controls").glob("*.png"))) == 10
    result = json.loads((out_dir / "result.json").read_text())
    assert all(row["verdict"] in ("member_evidence", "no_evidence") for row in result["images"])
    assert not (tmp_path / "cgidm-data").exists()  # the demo keeps its service data private
