"""The docker-compose stack checked as a user meets it (``make compose-test``, after the images
are built by ``scripts/compose_test.sh``).

Not a pytest test: it needs a Docker engine and several minutes. Everything goes through what a
user has: ``docker-compose`` commands, ``cgidm keys new`` run in the gateway container, ``cgidm
submit`` and the HTTP API on the published port. Only the S3 store and Redis are looked into
from inside their own containers, to check what the API says. Each stage is timed and the table
printed at the end.

Stages: up (stack healthy); a key; a demo job submitted with ``cgidm submit`` and its pictures,
``result.json`` and S3 objects checked; the worker killed mid-job (SIGKILL) and started again: the
job ends succeeded once, after the production lease TTL; Redis restarted with jobs queued: they
are still queued (append-only volume) and run; two workers (``--scale worker=2``): jobs of two
pairs run at the same time on different workers; ``down -v``.

No wait is a timing claim: each waits for its event and gives up only after NO_HANG seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cgidm.client import CgidmClient
from cgidm.commands.demo import find_dataset
from cgidm.queue_routing import slot_for_pair
from cgidm_core.names import STORED_KINDS

NO_HANG = 900  # seconds: past this a wait is a hang, not a slow machine
TERMINAL = ("succeeded", "failed", "cancelled")
BUCKET, PREFIX = "cgidm", "data"  # docker-compose.yml: CGIDM_STORAGE_URL=s3://cgidm/data
QUEUE = "cgidm"  # CGIDM_QUEUE's default: the slot queues are cgidm.slot<k>
#: What a job stores per image with the service's defaults (the base model's own recovery on).
PICTURE_KINDS = STORED_KINDS


class ComposeCheckError(AssertionError):
    """The stack did not do what a user is promised; the message says what and where."""


class Stack:
    """The compose project: its commands, its containers' health, the API on the host port."""

    def __init__(self, project: str, files: list[str], url: str) -> None:
        self.base = ["docker-compose", "-p", project]
        for name in files:
            self.base += ["-f", name]
        self.url = url
        self.env = dict(os.environ)
        self.timings: list[tuple[str, float]] = []

    def compose(self, *args: str, capture: bool = False, check: bool = True,
                quiet: bool = False) -> str:
        """Run a docker-compose command of the project, echoed unless ``quiet`` (polls)."""
        if not quiet:
            print("+", " ".join([*self.base, *args]), flush=True)
        done = subprocess.run([*self.base, *args], env=self.env, text=True, check=False,
                              stdout=subprocess.PIPE if capture else None)
        if check and done.returncode != 0:
            raise ComposeCheckError(f"`{' '.join(args)}` exited {done.returncode}")
        return done.stdout or ""

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service, capture=True, quiet=True).split()

    def health(self, container: str) -> str:
        out = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", container],
                             capture_output=True, text=True, check=False)
        return out.stdout.strip()

    def wait_healthy(self, services: tuple[str, ...], count: int = 1) -> None:
        def healthy() -> bool:
            ids = [c for s in services for c in self.containers(s)]
            return len(ids) >= count * len(services) and all(
                self.health(c) == "healthy" for c in ids)
        wait(healthy, f"{', '.join(services)} healthy", interval=2)

    def exec(self, service: str, *command: str, quiet: bool = True) -> str:
        return self.compose("exec", "-T", service, *command, capture=True, quiet=quiet)

    def s3_keys(self, prefix: str) -> list[str]:
        """Object keys under ``prefix`` in the S3 service, listed inside its container (CI's S3
        is moto's server, whose image has boto3; the port is not published)."""
        script = ("import boto3, json, os, sys; s3 = boto3.client('s3', endpoint_url="
                  "'http://127.0.0.1:9000', region_name='us-east-1', aws_access_key_id="
                  "os.environ['MINIO_ROOT_USER'], aws_secret_access_key="
                  "os.environ['MINIO_ROOT_PASSWORD']); pages = s3.get_paginator("
                  "'list_objects_v2').paginate(Bucket=sys.argv[1], Prefix=sys.argv[2]); "
                  "print(json.dumps([o['Key'] for p in pages for o in p.get('Contents', [])]))")
        return json.loads(self.exec("minio", "python3", "-c", script, BUCKET, prefix))

    def queued_messages(self) -> int:
        """Messages waiting in the job queues (the plain queue and its slot queues) in Redis."""
        script = ("local n = 0 for _, k in ipairs(redis.call('keys', ARGV[1])) do "
                  "if redis.call('type', k).ok == 'list' then n = n + redis.call('llen', k) end "
                  "end return n")
        return int(self.exec("redis", "redis-cli", "eval", script, "0", f"{QUEUE}*").strip())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"\n== {name}", flush=True)
        start = time.monotonic()
        yield
        seconds = time.monotonic() - start
        self.timings.append((name, seconds))
        print(f"== {name}: {seconds:.0f} s", flush=True)


def wait(predicate: Callable[[], Any], what: str, interval: float = 1.0) -> Any:
    """``predicate()``'s first truthy value; ComposeCheckError after NO_HANG seconds."""
    deadline = time.monotonic() + NO_HANG
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - not up yet (connection refused, 502...)
            value = None
        if value:
            return value
        time.sleep(interval)
    raise ComposeCheckError(f"waited {NO_HANG} s for {what}: a hang")


def wait_job(client: CgidmClient, job_id: str,
             until: Callable[[dict], bool] = lambda j: j["status"] in TERMINAL) -> dict:
    return wait(lambda: (lambda j: j if until(j) else None)(client.job(job_id)),
                f"job {job_id}", interval=1)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ComposeCheckError(message)


def published_once(stack: Stack, job: dict) -> None:
    """result.json and the pictures of exactly one run (the job's last attempt) are in S3."""
    keys = [k.removeprefix(f"{PREFIX}/jobs/{job['job_id']}/")
            for k in stack.s3_keys(f"{PREFIX}/jobs/{job['job_id']}/")]
    names = [item["name"] for item in job["inputs"]]
    pictures = {k for k in keys if k.startswith("attempts/")}
    expect(pictures == {f"attempts/{job['attempt']}/artifacts/{n}/{kind}.png"
                        for n in names for kind in PICTURE_KINDS},
           f"job {job['job_id']}: S3 holds {sorted(pictures)}, not one run's pictures")
    expect("result.json" in keys, f"job {job['job_id']}: no result.json in S3 ({keys})")


def make_key(stack: Stack) -> str:
    """`cgidm keys new` inside the gateway container; the entry goes into CGIDM_API_KEYS and
    the stack is brought up again with it (compose recreates the services whose settings
    changed), as the key's printout tells an operator to do."""
    out = stack.exec("gateway", "cgidm", "keys", "new", "compose-check", quiet=False)
    key = re.search(r"^\s+(\S{40,})$", out, re.MULTILINE).group(1)
    entry = re.search(r"^\s+(compose-check:[0-9a-f]{64})$", out, re.MULTILINE).group(1)
    stack.env["CGIDM_API_KEYS"] = entry
    stack.compose("up", "-d")
    stack.wait_healthy(("gateway", "worker"))
    return key


def submit_demo(stack: Stack, key: str, images: list[Path], steps: int, out: Path) -> dict:
    """`cgidm submit` of the demo pair from the host, as a user runs it."""
    cmd = [str(Path(sys.executable).with_name("cgidm")), "submit", "--server", stack.url,
           "--key", key, "--pretrained", "demo-base", "--finetuned", "demo-vangogh",
           "--steps", str(steps), "--timeout", str(NO_HANG), "--out", str(out),
           *map(str, images)]
    print("+", " ".join(cmd).replace(key, "$KEY"), flush=True)
    done = subprocess.run(cmd, text=True, capture_output=True, check=False)
    # its progress bar redraws on stderr: the last state is enough in a log
    print(done.stderr.rsplit("\r", 1)[-1].strip(), done.stdout, sep="\n", flush=True)
    expect(done.returncode == 0, f"cgidm submit exited {done.returncode}")
    job_id = re.search(r"\(job (\S+)\)", done.stdout).group(1)
    with CgidmClient(stack.url, key) as client:
        job = client.job(job_id)
    expect(job["status"] == "succeeded", f"job {job_id} is {job['status']}")
    result = json.loads((out / "result.json").read_text())
    expect(result == job["result"], "the downloaded result.json differs from the job's result")
    got = sorted(p.name for p in out.glob("*.png"))
    want = sorted(f"{item['name']}.{kind}.png" for item in result["images"]
                  for kind in PICTURE_KINDS)
    expect(got == want, f"downloaded pictures {got}, expected {want}")
    published_once(stack, job)
    return job


def submit(client: CgidmClient, images: list[Path], steps: int,
           finetuned: str = "demo-vangogh", pretrained: str = "demo-base") -> str:
    return client.submit(pretrained, finetuned, images, steps=steps, seed=0)["job_id"]


def worker_killed_mid_job(stack: Stack, client: CgidmClient, images: list[Path],
                          steps: int) -> dict:
    """SIGKILL the worker while a job runs, start it again: the job's lease expires (60 s,
    production), the reaper hands the job out again, and it ends succeeded with one run's
    pictures. The job runs the default 100 PGD steps (not the short demo job's): a 10-step job on
    a warm worker can finish before `docker compose kill` reaches the container."""
    job_id = submit(client, images, max(steps, 100))
    wait_job(client, job_id, lambda j: j["status"] == "running"
             and (j.get("progress") or {}).get("steps_done", 0) >= 1)
    stack.compose("kill", "worker")
    killed_at = time.monotonic()
    stack.compose("start", "worker")
    job = wait_job(client, job_id)
    print(f"job {job_id}: {job['status']} {time.monotonic() - killed_at:.0f} s after the kill, "
          f"attempts {job['attempts']}", flush=True)
    expect(job["status"] == "succeeded", f"job {job_id} ended {job['status']}: {job['error']}")
    expect(job["attempts"] >= 2, f"job {job_id} ran {job['attempts']} time(s): was it killed?")
    published_once(stack, job)
    return job


def redis_restarted_with_jobs_queued(stack: Stack, client: CgidmClient,
                                     images: list[Path]) -> None:
    """With no worker running, two jobs wait in Redis; `restart redis` keeps them (AOF on the
    redis-data volume); once a worker is back both run to succeeded."""
    stack.compose("stop", "worker")
    jobs = [submit(client, images[:1], 2) for _ in range(2)]
    before = stack.queued_messages()
    expect(before == 2, f"{before} messages queued in Redis, expected 2")
    stack.compose("restart", "redis")
    stack.wait_healthy(("redis",))
    after = wait(lambda: stack.queued_messages() or None, "queued messages after the restart")
    expect(after == before, f"{before} messages queued before the restart, {after} after")
    expect(all(client.job(j)["status"] == "queued" for j in jobs), "jobs not queued")
    stack.compose("start", "worker")
    for job_id in jobs:
        job = wait_job(client, job_id)
        expect(job["status"] == "succeeded", f"job {job_id} ended {job['status']}")
        published_once(stack, job)


def two_workers_two_pairs(stack: Stack, client: CgidmClient, images: list[Path],
                          steps: int) -> None:
    """`--scale worker=2`: two pairs whose slots belong to different workers (slot k goes to
    the (k mod 2)-th live worker) run at the same time, each on its own worker."""
    stack.compose("up", "-d", "--scale", "worker=2")
    stack.wait_healthy(("worker",), count=2)
    slots = int(stack.env.get("CGIDM_ROUTING_SLOTS", "16"))
    first = ("demo-base", "demo-vangogh")
    second = next(p for p in (("demo-base", "demo-vangogh-light"),
                              ("demo-flow-base", "demo-flow-vangogh"))
                  if slot_for_pair(*p, slots) % 2 != slot_for_pair(*first, slots) % 2)
    # both workers must see each other before their slots split (heartbeat in Redis)
    members = f"{QUEUE}.routing.workers"  # cgidm.queue_routing.members_key
    wait(lambda: int(stack.exec("redis", "redis-cli", "zcard", members).strip() or 0) >= 2,
         "two workers in the routing set")
    ids = [submit(client, images, steps, finetuned=pair[1], pretrained=pair[0])
           for pair in (first, second)]
    both = wait(lambda: (lambda js: js if all(j["status"] == "running" for j in js) else None)(
        [client.job(i) for i in ids]), "both jobs running at once")
    workers = {j["worker"]["worker_id"] for j in both}
    for job in both:
        print(f"running at once: {job['settings']['pretrained']}/{job['settings']['finetuned']} on "
              f"{job['worker']['worker_id']}", flush=True)
    expect(len(workers) == 2, f"both jobs ran on {workers}")
    for job_id in ids:
        job = wait_job(client, job_id)
        expect(job["status"] == "succeeded", f"job {job_id} ended {job['status']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default="cgidm-ci")
    parser.add_argument("-f", dest="files", action="append", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--steps", type=int, default=10,
                        help="PGD steps of the demo jobs (CPU; the method's default is 100)")
    parser.add_argument("--timings", help="file of 'stage<TAB>seconds' lines to print first")
    args = parser.parse_args(argv)
    stack = Stack(args.project, args.files, args.url)
    images = sorted((find_dataset(None) / "membership").glob("*"))[:2]
    failed = True
    try:
        with stack.stage("up (healthy)"):
            stack.compose("up", "-d")
            stack.wait_healthy(("redis", "minio", "gateway", "worker"))
        with stack.stage("API key (cgidm keys new in the gateway, up again)"):
            key = make_key(stack)
        with tempfile.TemporaryDirectory() as out, stack.stage(
                f"job: cgidm submit, 2 images, {args.steps} steps, CPU"):
            submit_demo(stack, key, images, args.steps, Path(out))
        with CgidmClient(stack.url, key) as client:
            with stack.stage("worker killed mid-job, job recovered (lease TTL 60 s)"):
                worker_killed_mid_job(stack, client, images, args.steps)
            with stack.stage("redis restarted with 2 jobs queued"):
                redis_restarted_with_jobs_queued(stack, client, images)
            with stack.stage("scale worker=2: two pairs at once"):
                two_workers_two_pairs(stack, client, images, args.steps)
        failed = False
    finally:
        if failed:
            stack.compose("ps", check=False)
            stack.compose("logs", "--tail=60", check=False)
        with stack.stage("down -v"):
            stack.compose("down", "-v", check=False)
        rows = []
        if args.timings and Path(args.timings).exists():
            rows = [line.split("\t") for line in Path(args.timings).read_text().splitlines()]
        rows += [(name, f"{seconds:.0f}") for name, seconds in stack.timings]
        print("\nstage                                                      seconds")
        for name, seconds in rows:
            print(f"{name:<58} {seconds:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
