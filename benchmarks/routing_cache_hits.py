#!/usr/bin/env python
"""Model-cache hit rate of cache-aware routing (``CGIDM_ROUTING=pair``) against a shared queue.

The same experiment as ``tests/service/test_routing.py``, with more jobs: real processes (Redis,
an S3 server, two Celery workers, the gateway), tiny DDPM pairs, one PGD step per job. For each
cache budget (pairs a worker can keep) and each routing mode, a fresh stack:

1. warm-up: one job on each of two warm-up pairs chosen to fall on different workers, so both
   workers have imported torch before the clock starts (in shared mode the second warm-up job
   is taken by the other worker, the first being busy with its imports);
2. a burst of ``--jobs`` jobs over ``--pairs`` pairs in a seeded random order, submitted as
   fast as the gateway takes them;
3. hits and misses from ``GET /metrics`` (this burst's share), the wall time from the first
   submission to the last job finished, and the seconds the workers spent loading pairs.

    python -m benchmarks.routing_cache_hits            # 24 jobs, 3 pairs, 2 workers, budgets 1, 2
    python -m benchmarks.routing_cache_hits --jobs 48 --budgets 1

Takes about four minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

from cgidm.queue_routing import slot_for_pair
from cgidm_testkit.processes import make_registry, start_moto, start_redis, stop_process
from cgidm_testkit.routing_stack import RoutingRun, alias_registry, routing_stack

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SLOTS = 16
WORKERS = 2


def pair_bytes(registry: Path) -> int:
    """Memory of one tiny pair, as the worker's cache counts it."""
    from cgidm_core import load_pair

    models = {m["id"]: m for m in json.loads(registry.read_text())["models"]}
    pair = load_pair(models["tiny-base"]["path"], models["tiny-ft"]["path"], device="cpu")
    return int(pair.memory_bytes())


def warm_up_names(workers: int) -> list[str]:
    """One pair name per worker: ``warm<i>`` whose slot belongs to that worker (k mod n)."""
    names: dict[int, str] = {}
    i = 0
    while len(names) < workers:
        owner = slot_for_pair(f"base-warm{i}", f"ft-warm{i}", SLOTS) % workers
        names.setdefault(owner, f"warm{i}")
        i += 1
    return [names[k] for k in range(workers)]


def run_one(root: Path, routing: str, budget: int, size: int, registry: Path,
            pairs: list[tuple[str, str]], warm: list[tuple[str, str]], sequence: list[int],
            redis_url: str, s3: str) -> tuple[RoutingRun, bool]:
    # The cache keeps `budget` pairs: before a load it evicts until the largest pair would fit.
    cache_bytes = 1 if budget == 1 else int((budget + 0.5) * size)
    name = f"bench-{routing}-{budget}"
    with routing_stack(root / name, name=name, routing=routing, redis_url=redis_url,
                       s3_endpoint=s3, registry=registry, workers=WORKERS, slots=SLOTS,
                       cache_bytes=cache_bytes) as stack:
        warmed = stack.run(warm, list(range(len(warm))), timeout=300)
        both = len({worker for _, worker, _ in warmed.trace}) == WORKERS
        return stack.run(pairs, sequence, timeout=300), both


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2],
                        help="pairs each worker's cache keeps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    names = [chr(ord("a") + i) for i in range(args.pairs)]
    rng = random.Random(args.seed)
    sequence = [rng.randrange(args.pairs) for _ in range(args.jobs)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cgidm-routing-") as tmp:
        root = Path(tmp)
        redis_proc, redis_url = start_redis(root / "redis")
        moto_proc, s3 = start_moto(root)
        try:
            tiny = make_registry(root / "tiny")
            warm_names = warm_up_names(WORKERS)
            made = alias_registry(tiny, root / "models.json", names + warm_names)
            pairs, warm = made[:len(names)], made[len(names):]
            size = pair_bytes(tiny)
            owners = {n: slot_for_pair(*p, SLOTS) % WORKERS
                      for n, p in zip(names, pairs, strict=True)}
            print(f"{args.jobs} jobs over pairs {', '.join(names)} (order: "
                  f"{''.join(names[i] for i in sequence)}); {WORKERS} workers; {SLOTS} slots; "
                  f"pair routing puts " + ", ".join(f"{n} on worker {o}" for n, o in
                                                     owners.items()) +
                  f"; one pair = {size / 1024**2:.1f} MiB", flush=True)
            for budget in args.budgets:
                for routing in ("shared", "pair"):
                    run, both = run_one(root, routing, budget, size, root / "models.json",
                                        pairs, warm, sequence, redis_url, s3)
                    per_worker: dict[str, int] = {}
                    for _, worker, _ in run.trace:
                        per_worker[worker] = per_worker.get(worker, 0) + 1
                    row = {"routing": routing, "cache_pairs": budget, "jobs": run.jobs,
                           "hits": run.hits, "misses": run.misses,
                           "hit_rate": round(run.hit_rate, 3),
                           "wall_s": round(run.seconds, 1),
                           "load_s": round(run.load_seconds, 2),
                           "jobs_per_worker": sorted(per_worker.values(), reverse=True),
                           "warm_up_on_both_workers": both}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            stop_process(moto_proc)
            stop_process(redis_proc)

    print()
    print("| routing | cache (pairs/worker) | jobs | hits | misses | hit rate | wall time (s) "
          "| loading (s) | jobs per worker |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['routing']} | {r['cache_pairs']} | {r['jobs']} | {r['hits']} | "
              f"{r['misses']} | {r['hit_rate']:.0%} | {r['wall_s']} | {r['load_s']} | "
              f"{' / '.join(map(str, r['jobs_per_worker']))} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
