"""How long a job waits after its worker is SIGKILLed, at the DEFAULT settings.

Starts, on 127.0.0.1 only, the stack of ``tests/service/test_worker_loss.py``: redis-server, an
S3 server (moto), the gateway and real Celery workers, tiny random DDPM pairs; lease 60 s,
heartbeat 10 s, reaper every 5 s, visibility timeout 4,500 s (none of them is set). For each
repetition and scenario it submits a job, SIGKILLs its worker once the job reports progress, and
polls ``GET /jobs/{id}`` twice a second:

- ``fresh worker``: the only worker is killed and a new one is started at once (the operator's
  case of the issue: "a fresh worker started at once");
- ``second worker``: two workers run; the one running the job is killed.

Prints, per run, the seconds from the SIGKILL until the job was seen running its second attempt
and until it succeeded, then the median and the worst, and the bound the design gives
(lease + reaper interval). Exits 1 if a job did not succeed exactly once with attempt 2.

    .venv/bin/python -m benchmarks.recovery --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cgidm.settings import Settings
from cgidm_testkit.processes import make_registry, start_moto, start_redis, stop_process
from cgidm_testkit.worker_loss import LossStack, kill_and_time

ROOT = Path(__file__).resolve().parents[1]


def run_once(stack: LossStack, scenario: str, steps: int, seed: int) -> dict:
    job_id = stack.submit(steps=steps, seed=seed)
    running = stack.wait_running(job_id)
    victim = stack.worker_of(running)
    killed = kill_and_time(victim)
    stack.workers.remove(victim)
    if scenario == "fresh worker":
        stack.start_worker()
    line = stack.follow(job_id, killed, timeout=300)
    job = stack.client.get(f"/jobs/{job_id}").json()
    results = [k for k in stack.keys(job_id) if k == "result.json"]
    ok = job["status"] == "succeeded" and job["attempts"] == 2 and len(results) == 1
    return {"scenario": scenario, "running_again": line.running_again,
            "succeeded": line.finished, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120, help="PGD steps per job")
    args = parser.parse_args()
    settings = Settings()
    bound = settings.lease_ttl + settings.reaper_interval
    rows = []
    with tempfile.TemporaryDirectory(prefix="cgidm-recovery-") as tmp:
        root = Path(tmp)
        redis_proc, redis_url = start_redis(root / "redis")
        moto_proc, s3 = start_moto(root)
        registry = make_registry(root)
        try:
            for scenario in ("fresh worker", "second worker"):
                stack = LossStack.start(root / scenario.replace(" ", "-"), redis_url, s3,
                                        registry)
                try:
                    stack.start_worker()
                    if scenario == "second worker":
                        stack.start_worker()
                    stack.warm(count=2)
                    for rep in range(args.repeats):
                        if scenario == "second worker" and len(stack.workers) < 2:
                            stack.start_worker()
                            stack.warm(count=2)
                        row = run_once(stack, scenario, args.steps, seed=10 + rep)
                        rows.append(row)
                        print(f"  {scenario:14s} run {rep + 1}: running again "
                              f"{row['running_again']:.1f} s, succeeded {row['succeeded']:.1f} s",
                              flush=True)
                finally:
                    stack.stop()
        finally:
            stop_process(moto_proc)
            stop_process(redis_proc)

    print()
    print(f"defaults: lease {settings.lease_ttl:g} s, heartbeat {settings.lease_heartbeat:g} s, "
          f"reaper every {settings.reaper_interval:g} s, visibility timeout "
          f"{settings.resolved_visibility_timeout} s; {args.steps} PGD steps per job")
    print(f"{'scenario':14s} | runs | SIGKILL -> running again (s): median / max | "
          "-> succeeded (s): median / max | exactly once")
    print("-" * 100)
    for scenario in ("fresh worker", "second worker"):
        mine = [r for r in rows if r["scenario"] == scenario]
        again = [r["running_again"] for r in mine]
        done = [r["succeeded"] for r in mine]
        print(f"{scenario:14s} | {len(mine):4d} | {statistics.median(again):6.1f} / "
              f"{max(again):6.1f}{'':22s}| {statistics.median(done):6.1f} / {max(done):6.1f}"
              f"{'':11s}| {sum(r['ok'] for r in mine)}/{len(mine)}")
    worst = max(r["running_again"] for r in rows)
    visibility = settings.resolved_visibility_timeout
    print(f"\nworst SIGKILL -> running again: {worst:.1f} s = {worst / bound:.2f} x the design "
          f"bound lease + reaper interval ({bound:g} s); before leases: the visibility timeout, "
          f"{visibility} s ({visibility / worst:.0f} x longer)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"(wall time {time.monotonic() - started:.0f} s)")
    sys.exit(code)
