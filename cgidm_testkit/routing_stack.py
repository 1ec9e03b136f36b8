"""One routing experiment with real processes: N Celery workers, the gateway, a burst of jobs.

Shared by ``tests/service/test_routing.py`` and ``benchmarks/routing_cache_hits.py``, so the
benchmark measures exactly what the test asserts. Each run gets its own queue name and storage
prefix, so several runs can share one Redis and one S3 server without seeing each other's
messages, worker entries or counters.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cgidm_testkit.processes import (
    launch_worker,
    png_bytes,
    stack_env,
    start_gateway,
    stop_process,
    wait_for_job,
    wait_until,
    wait_worker_ready,
)

_ROUTING_LINE = re.compile(rb"cgidm routing: worker (\S+) consumes slots \[([\d,]*)\] of \d+ "
                           rb"\(([^)]*)\)")


@dataclass
class RoutingRun:
    """What one burst of jobs did to the workers' model caches."""

    routing: str
    workers: int
    jobs: int
    hits: int  # from GET /metrics (the counters the workers publish)
    misses: int
    seconds: float  # first submission to last job finished
    load_seconds: float = 0.0  # time the workers spent in the cache (loading on a miss)
    #: per job, in submission order: (pair index, worker id, "hit" or "miss")
    trace: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def loads_per_pair(self) -> dict[int, int]:
        loads: dict[int, int] = {}
        for pair, _, outcome in self.trace:
            loads[pair] = loads.get(pair, 0) + (outcome == "miss")
        return loads


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"{name} not in /metrics:\n{text[:2000]}")
    return float(match.group(1))


def routing_state(log: Path) -> tuple[str, list[int], str] | None:
    """A worker's latest routing line: (worker id, slots it consumes, why), or None."""
    seen = _ROUTING_LINE.findall(log.read_bytes()) if log.exists() else []
    if not seen:
        return None
    member, slots, why = seen[-1]
    return member.decode(), [int(k) for k in slots.split(b",") if k], why.decode()


def routing_settled(logs: list[Path], workers: int | None) -> bool:
    """Every worker logged its queues; with ``workers``, each counts exactly that many."""
    states = [routing_state(log) for log in logs]
    if any(state is None for state in states):
        return False
    expected = f"{workers} worker{'s' if workers != 1 else ''}"
    return workers is None or all(state[2] == expected for state in states)


def alias_registry(source: Path, target: Path, names: list[str]) -> list[tuple[str, str]]:
    """A registry whose pairs ``base-<name>`` / ``ft-<name>`` reuse the tiny weights of
    ``source`` (a registry from ``make_registry``), alternating between its two pairs. The
    worker's cache keys on the ids, so each name is a pair of its own to the cache."""
    models = {m["id"]: m for m in json.loads(source.read_text())["models"]}
    weights = [(models["tiny-base"]["path"], models["tiny-ft"]["path"]),
               (models["other-base"]["path"], models["other-ft"]["path"])]
    entries = []
    for index, name in enumerate(names):
        pre, ft = weights[index % 2]
        entries += [{"id": f"base-{name}", "family": "ddpm", "path": pre},
                    {"id": f"ft-{name}", "family": "ddpm", "path": ft,
                     "finetuned_from": f"base-{name}"}]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"models": entries}))
    return [(f"base-{name}", f"ft-{name}") for name in names]


@dataclass
class RoutingStack:
    """Running workers and gateways of one experiment."""

    workers: list[Any]
    logs: list[Path]
    clients: dict[str, httpx.Client]  # by the gateway's CGIDM_ROUTING

    def submit(self, pretrained: str, finetuned: str, steps: int = 1, seed: int = 0,
               via: str | None = None) -> str:
        client = self.clients[via] if via else next(iter(self.clients.values()))
        response = client.post(
            "/authenticate",
            data={"pretrained": pretrained, "finetuned": finetuned, "steps": str(steps)},
            files=[("images", ("p.png", png_bytes(seed), "image/png"))])
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    @property
    def client(self) -> httpx.Client:
        return next(iter(self.clients.values()))

    def owner_of(self, slot: int) -> int:
        """Index in ``workers`` of the live worker whose latest routing line lists ``slot``."""
        owners = [i for i, log in enumerate(self.logs)
                  if self.workers[i].poll() is None
                  and slot in (routing_state(log) or ("", [], ""))[1]]
        assert len(owners) == 1, (slot, owners, [routing_state(log) for log in self.logs])
        return owners[0]

    def cache_counters(self) -> tuple[int, int]:
        """(hits, misses) summed over the workers, as ``GET /metrics`` reports them."""
        text = self.client.get("/metrics").text
        return (int(metric(text, "cgidm_model_cache_hits_total")),
                int(metric(text, "cgidm_model_cache_misses_total")))

    def run(self, pairs: list[tuple[str, str]], sequence: list[int], steps: int = 1,
            timeout: float = 120, via: str | None = None) -> RoutingRun:
        """Submit one job per entry of ``sequence`` (an index into ``pairs``) as fast as the
        gateway takes them, wait for all; counters are this burst's share of ``/metrics``."""
        hits0, misses0 = self.cache_counters()
        started = time.monotonic()
        job_ids = [self.submit(*pairs[pair], steps=steps, seed=index, via=via)
                   for index, pair in enumerate(sequence)]
        done = [wait_for_job(self.client, job_id, timeout=timeout) for job_id in job_ids]
        seconds = time.monotonic() - started
        bad = [job for job in done if job["status"] != "succeeded"]
        assert not bad, bad
        hits, misses = self.cache_counters()
        trace = [(pair, job["worker"]["worker_id"], job["worker"]["model_cache"])
                 for pair, job in zip(sequence, done, strict=True)]
        return RoutingRun(routing=via or next(iter(self.clients)), workers=len(self.workers),
                          jobs=len(sequence), hits=hits - hits0, misses=misses - misses0,
                          seconds=seconds, trace=trace,
                          load_seconds=sum(job["worker"]["load_seconds"] for job in done))


@contextmanager
def routing_stack(
    root: Path,
    *,
    name: str,
    routing: str,
    redis_url: str,
    s3_endpoint: str,
    registry: Path,
    workers: int = 2,
    slots: int = 16,
    cache_bytes: int = 1,
    gateways: tuple[str, ...] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[RoutingStack]:
    """``workers`` Celery workers with ``CGIDM_ROUTING=routing`` and one gateway per entry of
    ``gateways`` (their CGIDM_ROUTING; default: the workers'), on a queue name and storage
    prefix of their own (``name``), ready and (in pair mode) agreeing on who owns which slot.

    Workers consume the plain queue in every mode, so a ``shared`` gateway in front of ``pair``
    workers is a shared queue: any free worker takes the next job. ``cache_bytes=1`` leaves
    room for the pair in use only (the cache evicts before a load until the largest pair seen
    would fit): a budget of one pair per worker.
    """
    root.mkdir(parents=True, exist_ok=True)
    env = stack_env(broker_url=redis_url, s3_endpoint=s3_endpoint, prefix=name,
                    registry=registry, data_dir=root / "data", extra={
                        "CGIDM_QUEUE": name,
                        "CGIDM_ROUTING": routing,
                        "CGIDM_ROUTING_SLOTS": str(slots),
                        "CGIDM_MODEL_CACHE_BYTES": str(cache_bytes),
                        **(extra_env or {}),
                    })
    logs = [root / f"{name}-worker{i}.log" for i in range(workers)]
    procs: list[Any] = []
    clients: dict[str, httpx.Client] = {}
    try:
        # All workers start at once; each imports torch only with its first job.
        procs = [launch_worker(env, log, node=f"w{i}-{name}@%h") for i, log in enumerate(logs)]
        for mode in gateways or (routing,):
            gateway, url = start_gateway({**env, "CGIDM_ROUTING": mode},
                                         root / f"{name}-gateway-{mode}.log")
            procs.append(gateway)
            clients[mode] = httpx.Client(base_url=url, timeout=60)
        for proc, log in zip(procs, logs, strict=False):
            wait_worker_ready(proc, log)
        # In pair mode, wait until every worker counts all the others: before that, two
        # workers can briefly consume the same slot.
        wait_until(lambda: routing_settled(logs, workers if routing == "pair" else None), 30,
                   "workers agreeing on slot owners")
        yield RoutingStack(procs[:workers], logs, clients)
    finally:
        for client in clients.values():
            client.close()
        for proc in procs:  # all at once: each warm shutdown takes a moment
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            stop_process(proc)
