"""A stack for worker-loss scenarios at the DEFAULT lease and visibility settings, shared by
``test_worker_loss.py`` and ``benchmarks/recovery.py``: Redis, an S3 server, a gateway over
HTTP and real Celery workers that the scenario SIGKILLs and starts.

Only the queue, the storage prefix and (for the poison scenario) ``CGIDM_MAX_ATTEMPTS`` or the
test-only ``CGIDM_TEST_FAULTS`` hook are set; ``CGIDM_VISIBILITY_TIMEOUT`` (4,500 s),
``CGIDM_LEASE_TTL`` (60 s), ``CGIDM_LEASE_HEARTBEAT`` (10 s) and ``CGIDM_REAPER_INTERVAL``
(5 s) keep their defaults.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cgidm_testkit.processes import (
    BUCKET,
    bucket_keys,
    kill_process,
    launch_worker,
    png_bytes,
    s3_client,
    stack_env,
    start_gateway,
    stop_process,
    wait_for_job,
    wait_worker_ready,
)


@dataclass
class Timeline:
    """What a client polling GET /jobs/{id} saw, in seconds after the SIGKILL."""

    killed_at: float
    recovering: float | None = None  # first seen queued + recovering (attempt 2 due)
    running_again: float | None = None  # first seen running its second attempt
    finished: float | None = None
    views: list[dict] = field(default_factory=list)


@dataclass
class LossStack:
    root: Path
    s3: str
    prefix: str
    env: dict[str, str]
    client: httpx.Client
    gateway: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def start(cls, root: Path, redis_url: str, s3: str, registry: Path,
              extra: dict[str, str] | None = None) -> LossStack:
        name = f"loss-{uuid.uuid4().hex[:6]}"
        root.mkdir(parents=True, exist_ok=True)
        env = stack_env(broker_url=redis_url, s3_endpoint=s3, prefix=name, registry=registry,
                        data_dir=root / "data", extra={"CGIDM_QUEUE": name, **(extra or {})})
        gateway, url = start_gateway(env, root / "gateway.log")
        return cls(root, s3, name, env, httpx.Client(base_url=url, timeout=30), gateway)

    def start_worker(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.root / "workers.log"
        start = log.stat().st_size if log.exists() else 0
        proc = launch_worker(env or self.env, log, node=f"w{len(self.workers)}-{self.prefix}@%h")
        self.workers.append(proc)
        wait_worker_ready(proc, log, timeout=120, start=start)
        return proc

    def worker_of(self, job: dict) -> subprocess.Popen:
        """The worker process running ``job`` (worker ids end with the process id)."""
        pid = int(job["worker"]["worker_id"].rsplit("-", 1)[1])
        return next(p for p in self.workers if p.pid == pid)

    def submit(self, steps: int, seed: int = 1) -> str:
        response = self.client.post(
            "/authenticate", data={"pretrained": "tiny-base", "finetuned": "tiny-ft",
                                   "steps": str(steps)},
            files=[("images", ("p.png", png_bytes(seed), "image/png"))])
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def submit_audit(self, models: list[dict], steps: int, images: int = 2) -> str:
        """An audit of ``models`` (every one gets the full verdict: screen_clear_p 1), ``images``
        generated pictures against as many controls."""
        files = [("images", (f"i{k}.png", png_bytes(k), "image/png")) for k in range(images)]
        files += [("controls", (f"c{k}.png", png_bytes(50 + k), "image/png"))
                  for k in range(images)]
        response = self.client.post("/audits", files=files, data={
            "models": json.dumps(models), "steps": str(steps), "screen_clear_p": "1"})
        assert response.status_code == 202, response.text
        return response.json()["audit_id"]

    def audit_entries(self, audit_id: str) -> dict[int, dict]:
        """Index -> the model entry stored in S3 (``audits/<id>/models/NNNN.json``)."""
        client = s3_client(self.s3)
        base = f"{self.prefix}/audits/{audit_id}/models/"
        return {int(key.rsplit("/", 1)[1].removesuffix(".json")): json.loads(
                    client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
                for key in bucket_keys(self.s3, base)}

    def warm(self, count: int = 1) -> None:
        """Run short jobs until every worker has loaded torch and the pair."""
        jobs = [self.submit(steps=1, seed=90 + i) for i in range(count)]
        for job_id in jobs:
            assert wait_for_job(self.client, job_id, timeout=240)["status"] == "succeeded"

    def wait_running(self, job_id: str) -> dict:
        return wait_for_job(self.client, job_id, timeout=240, until=lambda j: j[
            "status"] == "running" and j["progress"]["steps_done"] > 0)

    def follow(self, job_id: str, killed_at: float, timeout: float,
               until_recovering: bool = False) -> Timeline:
        """Poll the job twice a second until it ends (or, with ``until_recovering``, until it
        shows as recovering), noting when recovery became visible."""
        line = Timeline(killed_at)
        deadline = killed_at + timeout
        while time.monotonic() < deadline:
            view = self.client.get(f"/jobs/{job_id}").json()
            now = time.monotonic() - killed_at
            line.views.append({"t": round(now, 1), "status": view["status"],
                               "attempts": view["attempts"], "recovering": view["recovering"],
                               "steps_done": view["progress"]["steps_done"]})
            if line.recovering is None and view["recovering"]:
                line.recovering = now
                if until_recovering:
                    return line
            if line.running_again is None and view["status"] == "running" and \
                    view["attempts"] >= 2:
                line.running_again = now
            if view["status"] in ("succeeded", "failed", "cancelled"):
                line.finished = now
                return line
            time.sleep(0.5)
        return line

    def keys(self, job_id: str) -> list[str]:
        base = f"{self.prefix}/jobs/{job_id}/"
        return [k.removeprefix(base) for k in bucket_keys(self.s3, base)]

    def stop(self) -> None:
        for proc in self.workers:
            stop_process(proc, timeout=30)
        stop_process(self.gateway)
        self.client.close()


def kill_and_time(proc: subprocess.Popen) -> float:
    """SIGKILL ``proc`` (as the OOM killer would) and return the moment, monotonic."""
    kill_process(proc)
    return time.monotonic()

