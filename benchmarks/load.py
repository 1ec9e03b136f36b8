"""Load test: hundreds of submissions from concurrent clients against the real stack.

Starts, on 127.0.0.1 only, the same processes the service tests start (cgidm_testkit/processes.py):
redis-server, an S3 server (moto), the gateway (uvicorn) and N Celery workers, with tiny random
DDPM pairs and 1-2 PGD steps per job. Then:

1. ``--clients`` concurrent httpx clients submit ``--jobs`` jobs as fast as they can. Above
   ``--max-queue-depth`` waiting jobs the gateway answers 429 + Retry-After; a client then
   waits that long and submits again (up to ``--max-tries`` times). After each accepted
   submission the client reads the job's status once (status latency under load).
2. Every accepted job is polled until it ends (bounded by ``--timeout``).
3. Storage is checked: each job has one record, and a succeeded job has result.json and exactly
   one run's pictures (3 per image); the record shows one attempt (no duplicate run).

It prints a table and exits 0 when no accepted job was lost or duplicated, else 1. Everything
stops by itself within ``--timeout`` seconds (default 240).

    .venv/bin/python -m benchmarks.load --jobs 300 --clients 16 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from cgidm_testkit.processes import (
    BUCKET,
    TERMINAL,
    bucket_keys,
    make_registry,
    png_bytes,
    s3_client,
    stack_env,
    start_gateway,
    start_moto,
    start_redis,
    start_worker,
    stop_process,
)

ROOT = Path(__file__).resolve().parents[1]

#: Storage prefix of the load test's jobs in the test bucket.
PREFIX = "load"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Load:
    def __init__(self, args: argparse.Namespace, url: str):
        self.args, self.url = args, url
        self.submit_ms: list[float] = []
        self.status_ms: list[float] = []
        self.responses: Counter[int] = Counter()  # POST /authenticate
        self.status_codes: Counter[int] = Counter()  # GET /jobs/{id}
        self.accepted: list[str] = []
        self.gave_up = 0
        self.errors: Counter[str] = Counter()
        self.max_depth = 0

    async def submit_one(self, client: httpx.AsyncClient, index: int) -> None:
        data = {"pretrained": "tiny-base", "finetuned": "tiny-ft",
                "steps": str(1 + index % self.args.max_steps)}
        files = [("images", (f"img{index}.png", png_bytes(index), "image/png"))]
        for _ in range(self.args.max_tries):
            started = time.perf_counter()
            try:
                response = await client.post("/authenticate", data=data, files=files)
            except httpx.HTTPError as exc:
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.5)
                continue
            self.submit_ms.append((time.perf_counter() - started) * 1000)
            self.responses[response.status_code] += 1
            if response.status_code == 202:
                job_id = response.json()["job_id"]
                self.accepted.append(job_id)
                started = time.perf_counter()
                status = await client.get(f"/jobs/{job_id}")
                self.status_ms.append((time.perf_counter() - started) * 1000)
                self.status_codes[status.status_code] += 1
                return
            if response.status_code in (429, 503):
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            self.errors[f"HTTP {response.status_code}"] += 1
            return
        self.gave_up += 1

    async def submit_all(self) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(self.args.jobs):
            queue.put_nowait(index)

        async def client_loop() -> None:
            async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
                while not queue.empty():
                    await self.submit_one(client, queue.get_nowait())

        await asyncio.gather(*(client_loop() for _ in range(self.args.clients)),
                             self.watch_depth())

    async def watch_depth(self) -> None:
        import redis.asyncio as aioredis

        conn = aioredis.Redis.from_url(self.args.redis_url)
        try:
            while len(self.accepted) + self.gave_up < self.args.jobs and not self.errors:
                self.max_depth = max(self.max_depth, await conn.llen("cgidm"))
                await asyncio.sleep(0.2)
                if len(self.accepted) + self.gave_up + sum(
                        v for k, v in self.errors.items()) >= self.args.jobs:
                    break
        finally:
            await conn.aclose()

    async def wait_all(self, deadline: float) -> dict[str, dict]:
        """Poll every accepted job until it ends (or the deadline passes)."""
        final: dict[str, dict] = {}
        pending = list(self.accepted)
        sem = asyncio.Semaphore(self.args.clients)
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:

            async def poll(job_id: str) -> None:
                async with sem:
                    started = time.perf_counter()
                    response = await client.get(f"/jobs/{job_id}")
                    self.status_ms.append((time.perf_counter() - started) * 1000)
                    self.status_codes[response.status_code] += 1
                    job = response.json()
                    if job.get("status") in TERMINAL:
                        final[job_id] = job

            while pending and time.monotonic() < deadline:
                await asyncio.gather(*(poll(j) for j in pending))
                pending = [j for j in pending if j not in final]
                if pending:
                    await asyncio.sleep(1.0)
        return final


def check_storage(endpoint: str, jobs: dict[str, dict], accepted: list[str]) -> dict[str, int]:
    """One record per accepted job; succeeded jobs have one run's full pictures + result."""
    keys = bucket_keys(endpoint, f"{PREFIX}/jobs/")
    by_job: dict[str, list[str]] = {}
    for key in keys:
        job_id, rest = key.split("/")[2], "/".join(key.split("/")[3:])
        by_job.setdefault(job_id, []).append(rest)
    s3 = s3_client(endpoint)
    counts = Counter()
    for job_id in accepted:
        stored = by_job.get(job_id, [])
        if "job.json" not in stored:
            counts["no_record"] += 1
            continue
        record = json.loads(s3.get_object(Bucket=BUCKET,
                                          Key=f"{PREFIX}/jobs/{job_id}/job.json")["Body"].read())
        if record["attempts"] != 1:
            counts["more_than_one_run"] += 1
        runs = {k.split("/")[1] for k in stored if k.startswith("attempts/")}
        if record["status"] == "succeeded":
            pictures = [k for k in stored if k.startswith("attempts/")]
            ok = (runs == {record["attempt"]} and len(pictures) == 3 * len(record["inputs"])
                  and "result.json" in stored)
            counts["succeeded_complete" if ok else "succeeded_incomplete"] += 1
        else:
            counts[f"{record['status']}"] += 1
            if runs:
                counts["pictures_of_unfinished_job"] += 1
    counts["objects"] = len(keys)
    counts["jobs_in_storage"] = len(by_job)
    return dict(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=2, help="jobs use 1..N PGD steps")
    parser.add_argument("--max-queue-depth", type=int, default=40)
    parser.add_argument("--retry-after", type=int, default=1)
    parser.add_argument("--max-tries", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=240.0, help="whole run, seconds")
    args = parser.parse_args()

    started = time.monotonic()
    deadline = started + args.timeout
    root = Path(tempfile.mkdtemp(prefix="cgidm-load-"))
    procs = []
    try:
        registry = make_registry(root)
        redis_proc, args.redis_url = start_redis(root)
        procs.append(redis_proc)
        moto_proc, s3 = start_moto(root)
        procs.append(moto_proc)
        env = stack_env(broker_url=args.redis_url, s3_endpoint=s3, prefix=PREFIX,
                        registry=registry, data_dir=root / "data", extra={
                            "CGIDM_PROGRESS_INTERVAL": "1",
                            "CGIDM_CANCEL_CHECK_INTERVAL": "1",
                            "CGIDM_MAX_QUEUE_DEPTH": str(args.max_queue_depth),
                            "CGIDM_QUEUE_RETRY_AFTER": str(args.retry_after),
                        })
        gateway, url = start_gateway(env, root / "gateway.log", extra_args=("--log-level",
                                                                              "warning"))
        procs.append(gateway)
        for i in range(args.workers):
            procs.append(start_worker(env, root / f"worker{i}.log"))
        setup = time.monotonic() - started

        load = Load(args, url)
        t0 = time.monotonic()
        asyncio.run(load.submit_all())
        submit_wall = time.monotonic() - t0
        final = asyncio.run(load.wait_all(deadline))
        drain_wall = time.monotonic() - t0
        storage = check_storage(s3, final, load.accepted)
    finally:
        for proc in reversed(procs):
            stop_process(proc)

    statuses = Counter(job["status"] for job in final.values())
    unfinished = len(load.accepted) - len(final)
    duplicates = len(load.accepted) - len(set(load.accepted)) + storage.get(
        "more_than_one_run", 0)
    lost = unfinished + storage.get("no_record", 0) + storage.get("succeeded_incomplete", 0)
    other_posts = sum(load.responses.values()) - load.responses[202] - load.responses[429]
    rows = [
        ("submissions wanted", args.jobs),
        ("concurrent clients / workers", f"{args.clients} / {args.workers}"),
        ("max queue depth (setting / seen)", f"{args.max_queue_depth} / {load.max_depth}"),
        ("POST answers 202 / 429 / other", f"{load.responses[202]} / {load.responses[429]} / "
         f"{other_posts}"),
        ("GET status answers", dict(load.status_codes)),
        ("client errors", dict(load.errors) or 0),
        ("gave up after max tries", load.gave_up),
        ("accepted jobs", len(load.accepted)),
        ("ended: succeeded / failed / cancelled", f"{statuses['succeeded']} / "
         f"{statuses['failed']} / {statuses['cancelled']}"),
        ("unfinished at deadline", unfinished),
        ("lost (no record, unfinished, missing pictures)", lost),
        ("duplicated (two runs or two ids)", duplicates),
        ("storage: succeeded with one complete run", storage.get("succeeded_complete", 0)),
        ("storage: objects / job folders", f"{storage['objects']} / "
         f"{storage['jobs_in_storage']}"),
        ("submit latency p50 / p99 / max (ms)", f"{percentile(load.submit_ms, 50):.0f} / "
         f"{percentile(load.submit_ms, 99):.0f} / {max(load.submit_ms, default=0):.0f}"),
        ("status latency p50 / p99 / max (ms)", f"{percentile(load.status_ms, 50):.0f} / "
         f"{percentile(load.status_ms, 99):.0f} / {max(load.status_ms, default=0):.0f}"),
        ("status reads", len(load.status_ms)),
        ("set-up (s) / all submitted (s) / all ended (s)",
         f"{setup:.1f} / {submit_wall:.1f} / {drain_wall:.1f}"),
        ("throughput (jobs/s, submission start to last end)",
         f"{len(final) / drain_wall:.2f}" if drain_wall else "-"),
        ("submit latency mean (ms)", f"{statistics.fmean(load.submit_ms):.0f}"
         if load.submit_ms else "-"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}} | value")
    print(f"{'-' * width}-|------")
    for name, value in rows:
        print(f"{name:<{width}} | {value}")
    ok = lost == 0 and duplicates == 0 and load.gave_up == 0 and not load.errors
    print("\nRESULT:", "no accepted job lost or duplicated" if ok else "PROBLEMS (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
