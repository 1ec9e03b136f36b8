"""Cache-aware routing (cgidm/queue_routing.py, worker/slot_consumer.py).

Pure tests of the rule (stable slots, one owner per slot), then real processes: Redis, an S3
server, two Celery workers and the gateway, tiny model pairs, one PGD step per job, a model
cache that holds one pair per worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from pydantic import ValidationError

from cgidm.queue_routing import (
    all_queues,
    owned_slots,
    queue_for_pair,
    queues_for_member,
    queues_for_worker,
    slot_for_pair,
)
from cgidm.settings import Settings
from cgidm_testkit.processes import (
    REPO_ROOT,
    child_env,
    kill_process,
    png_bytes,
    start_gateway,
    stop_process,
    wait_for_job,
    wait_until,
)
from cgidm_testkit.routing_stack import (
    alias_registry,
    metric,
    routing_stack,
    routing_state,
)

PAIR_A = ("tiny-base", "tiny-ft")
PAIR_B = ("other-base", "other-ft")


def _settings(**values: object) -> Settings:
    return Settings(**{"queue": "q", **values})


# ------------------------------------------------------------------------------------------
# the rule


def test_slot_of_a_pair_is_the_same_in_every_process():
    """Python's hash() of a str changes with PYTHONHASHSEED, i.e. between the gateway and each
    worker; the slot must not."""
    pairs = [PAIR_A, PAIR_B, ("demo-base", "demo-vangogh"), ("sd15", "sd15-vangogh")]
    here = [slot_for_pair(*pair, 16) for pair in pairs]
    code = ("import json, sys; from cgidm.queue_routing import slot_for_pair; "
            f"print(json.dumps([slot_for_pair(a, b, 16) for a, b in {pairs!r}]))")
    for seed in ("1", "4242"):
        env = child_env({"PYTHONHASHSEED": seed})
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, check=True,
                             capture_output=True, text=True).stdout
        assert json.loads(out) == here
    # Pinned: a change of the hash would send a running deployment's pairs to other workers.
    assert here[2] == 10 and slot_for_pair("demo-base", "demo-vangogh", 1) == 0


def test_slots_spread_pairs_evenly_and_order_matters():
    from scipy.stats import chisquare

    counts = Counter(slot_for_pair(f"base-{i}", f"ft-{i}", 16) for i in range(4000))
    assert chisquare([counts[k] for k in range(16)]).pvalue > 0.05, counts  # uniform
    # (pretrained, fine-tuned) is an ordered pair, and the separator keeps ids apart.
    assert len({slot_for_pair("a", "b", 1024), slot_for_pair("b", "a", 1024),
                slot_for_pair("ab", "", 1024)}) == 3


def test_queue_for_pair_by_mode():
    shared, pair = _settings(routing="shared"), _settings(routing="pair", routing_slots=8)
    assert queue_for_pair(*PAIR_A, shared) == queue_for_pair(*PAIR_B, shared) == "q"
    assert queue_for_pair(*PAIR_A, pair) == f"q.slot{slot_for_pair(*PAIR_A, 8)}"
    assert {queue_for_pair(f"b{i}", f"f{i}", pair) for i in range(200)} == \
        {f"q.slot{k}" for k in range(8)}
    assert all_queues(pair) == ["q"] + [f"q.slot{k}" for k in range(8)]


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 16, 20])
def test_every_slot_has_exactly_one_owner_and_owners_are_balanced(workers):
    settings = _settings(routing="pair", routing_slots=16)
    owned = [owned_slots(i, workers, 16) for i in range(workers)]
    flat = [k for slots in owned for k in slots]
    assert sorted(flat) == list(range(16))  # every slot once: none starves, none shared
    sizes = [len(slots) for slots in owned]
    assert max(sizes) - min(sizes) <= 1
    for i in range(workers):  # the plain queue too, so jobs sent in shared mode still run
        assert queues_for_worker(i, workers, settings) == \
            ["q", *(f"q.slot{k}" for k in owned[i])]
    with pytest.raises(ValueError):
        owned_slots(workers, workers, 16)


def test_queues_for_member_depend_on_the_set_not_its_order():
    settings = _settings(routing="pair", routing_slots=6)
    members = ["host-b-7", "host-a-9", "host-c-1"]
    views = {m: queues_for_member(m, list(reversed(members)), settings) for m in members}
    assert views["host-a-9"] == queues_for_member("host-a-9", members, settings) == \
        ["q", "q.slot0", "q.slot3"]
    assert sorted(q for v in views.values() for q in v if q != "q") == \
        sorted(all_queues(settings)[1:])
    # A worker whose own heartbeat is not visible yet still counts itself.
    assert queues_for_member("host-d-2", members, settings) == ["q", "q.slot3"]
    # Shared mode: every worker serves every queue.
    shared = _settings(routing="shared", routing_slots=6)
    assert queues_for_member("host-a-9", members, shared) == all_queues(shared)


def test_sticky_queue_order_keeps_the_loaded_pair_then_yields():
    from worker.slot_consumer import STICKY_STREAK, sticky_cycle

    cycle = sticky_cycle(["q", "q.slot1", "q.slot3"])
    cycle.rotate("q.slot3")  # the job just taken came from slot 3: look there first next time
    assert cycle.consume(3) == ["q.slot3", "q", "q.slot1"]
    for _ in range(STICKY_STREAK - 2):
        cycle.rotate("q.slot3")
    assert cycle.consume(3)[0] == "q.slot3"
    cycle.rotate("q.slot3")  # STICKY_STREAK in a row: the other queues' turn
    assert cycle.consume(3) == ["q", "q.slot1", "q.slot3"]
    cycle.rotate("q.slot1")
    assert cycle.consume(3) == ["q.slot1", "q", "q.slot3"]
    cycle.rotate("q.slot9")  # a queue cancelled meanwhile: nothing moves
    assert cycle.consume(3) == ["q.slot1", "q", "q.slot3"]


def test_worker_app_uses_the_sticky_order_only_with_pair_routing_on_redis():
    code = ("import json, worker.celery_app as m; "
            "print(json.dumps(m.app.conf.broker_transport_options.get('queue_order_strategy')))")
    found = {}
    for routing, broker in (("pair", "redis://127.0.0.1:1/0"), ("shared", "redis://127.0.0.1:1/0"),
                            ("pair", "sqla+sqlite:////tmp/unused.sqlite")):
        env = child_env({"CGIDM_ROUTING": routing, "CGIDM_BROKER_URL": broker})
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, check=True,
                             capture_output=True, text=True).stdout
        found[routing, broker.split(":")[0]] = json.loads(out)
    assert found == {("pair", "redis"): "worker.slot_consumer:sticky_cycle",
                     ("shared", "redis"): None, ("pair", "sqla+sqlite"): None}
    from kombu.utils.scheduling import cycle_by_name

    from worker.slot_consumer import sticky_cycle

    assert cycle_by_name(found["pair", "redis"]) is sticky_cycle  # what kombu will load


def test_routing_settings_are_checked():
    with pytest.raises(ValidationError):
        _settings(routing="round-robin")
    with pytest.raises(ValidationError):
        _settings(routing_slots=0)
    with pytest.raises(ValidationError):
        _settings(routing_member_ttl=1)
    assert Settings().routing == "shared"  # one worker, one queue: nothing to route


def test_compose_gateway_and_workers_agree_on_routing():
    """The gateway picks the queue, the workers consume it: same mode, same slot count."""
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    envs = [services[name]["environment"] for name in ("gateway", "worker")]
    for key in ("CGIDM_ROUTING", "CGIDM_ROUTING_SLOTS", "CGIDM_QUEUE"):
        assert envs[0].get(key) == envs[1].get(key), key
    assert envs[1]["CGIDM_ROUTING"] == "${CGIDM_ROUTING:-pair}"


# ------------------------------------------------------------------------------------------
# real processes


@pytest.fixture(scope="module")
def routed(tmp_path_factory, registry_file) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A registry of four pairs over the two tiny models, and the pairs by name. At 16 slots,
    a and c fall on slots of different parity, i.e. on different workers of two (slot k
    belongs to worker k mod 2); b and d are for the shared queue, where slots play no part."""
    names = ["a", "b", "c", "d"]
    registry = tmp_path_factory.mktemp("routing") / "models.json"
    made = alias_registry(registry_file, registry, names)
    return registry, dict(zip(names, made, strict=True))


@pytest.mark.slow
def test_gateway_counts_jobs_in_every_slot_queue(tmp_path, redis_url, s3_endpoint, routed):
    """Queue depth (/metrics, and the 429 check) sums the plain queue and every slot queue."""
    routed_registry, pairs = routed
    env = child_env({"CGIDM_BROKER_URL": redis_url, "CGIDM_STORAGE_URL": "s3://cgidm-test/depth",
                     "CGIDM_S3_ENDPOINT_URL": s3_endpoint, "CGIDM_MODELS": str(routed_registry),
                     "CGIDM_DATA_DIR": str(tmp_path), "CGIDM_QUEUE": "depth",
                     "CGIDM_ROUTING": "pair", "CGIDM_MAX_QUEUE_DEPTH": "3"})
    gateway, url = start_gateway(env, tmp_path / "gateway.log")
    broker = redis.Redis.from_url(redis_url)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            def post(pair: tuple[str, str]) -> httpx.Response:
                return client.post("/authenticate",
                                   data={"pretrained": pair[0], "finetuned": pair[1]},
                                   files=[("images", ("p.png", png_bytes(1), "image/png"))])

            a, c = pairs["a"], pairs["c"]
            for pair in (a, c, a):
                assert post(pair).status_code == 202
            qa, qc = (f"depth.slot{slot_for_pair(*p, 16)}" for p in (a, c))
            assert qa != qc
            assert (broker.llen(qa), broker.llen(qc), broker.llen("depth")) == (2, 1, 0)
            assert metric(client.get("/metrics").text, "cgidm_queue_depth") == 3
            full = post(c)  # CGIDM_MAX_QUEUE_DEPTH counts every slot queue too
            assert full.status_code == 429, full.text
    finally:
        stop_process(gateway)


@pytest.mark.slow
def test_pair_routing_loads_each_pair_once_and_beats_a_shared_queue(
        tmp_path, redis_url, s3_endpoint, routed):
    """Two workers with room for one pair each; a burst of X X Y Y X X Y Y through a shared
    gateway (any free worker takes the next job), then through a pair-routing gateway.

    shared (first, on cold workers): the second X job is taken by the other, idle worker while
    the first one still starts up, so both workers load X, and someone loads Y: at least three
    loads for eight jobs. (Not X Y X Y: two workers in lockstep on one FIFO queue can take
    alternating pairs in step by chance.)
    pair (two pairs not seen before): every X job runs on one worker and every Y job on the
    other, so each pair is loaded once: hits = jobs - pairs.
    """
    routed_registry, pairs = routed
    sequence = [0, 0, 1, 1, 0, 0, 1, 1]
    assert slot_for_pair(*pairs["a"], 16) % 2 != slot_for_pair(*pairs["c"], 16) % 2
    with routing_stack(tmp_path, name="route-cmp", routing="pair", redis_url=redis_url,
                       s3_endpoint=s3_endpoint, registry=routed_registry,
                       gateways=("shared", "pair")) as stack:
        shared = stack.run([pairs["b"], pairs["d"]], sequence, via="shared")
        pair = stack.run([pairs["a"], pairs["c"]], sequence, via="pair")

    assert (shared.hits + shared.misses, pair.hits + pair.misses) == (8, 8)
    assert [m for _, _, m in shared.trace].count("miss") == shared.misses  # /metrics == jobs
    assert shared.misses >= 3 and shared.loads_per_pair()[0] >= 2, shared.trace
    assert len({w for _, w, _ in shared.trace}) == 2

    assert (pair.hits, pair.misses) == (6, 2), pair.trace
    assert pair.loads_per_pair() == {0: 1, 1: 1}
    workers_of = {p: {w for q, w, _ in pair.trace if q == p} for p in (0, 1)}
    assert len(workers_of[0]) == len(workers_of[1]) == 1 and workers_of[0] != workers_of[1]
    assert pair.hit_rate > shared.hit_rate


@pytest.mark.slow
def test_a_dead_workers_slots_are_taken_over(tmp_path, redis_url, s3_endpoint, routed):
    """SIGKILL (no goodbye): once the dead worker's heartbeat expires
    (CGIDM_ROUTING_MEMBER_TTL) the survivor consumes its slots too, and takes the job that
    was waiting in one of them."""
    routed_registry, pairs = routed
    ttl = 3
    pair = pairs["a"]
    slot = slot_for_pair(*pair, 16)
    with routing_stack(tmp_path, name="route-kill", routing="pair", redis_url=redis_url,
                       s3_endpoint=s3_endpoint, registry=routed_registry,
                       extra_env={"CGIDM_ROUTING_MEMBER_TTL": str(ttl)}) as stack:
        dead = stack.owner_of(slot)
        survivor = 1 - dead
        kill_process(stack.workers[dead])
        killed_at = time.monotonic()
        job_id = stack.submit(*pair)  # waits in the dead worker's slot queue
        wait_until(lambda: routing_state(stack.logs[survivor])[1] == list(range(16)), ttl + 15,
                   "the survivor taking over every slot")
        assert time.monotonic() - killed_at < ttl + 10
        assert stack.owner_of(slot) == survivor
        # The survivor takes the job (it then imports torch for its first job: not waited for).
        wait_until(lambda: f"[{job_id}] received".encode() in stack.logs[survivor].read_bytes(),
                   30, "the survivor receiving the job")
        assert wait_for_job(stack.client, job_id, timeout=30,
                            until=lambda j: j["status"] != "queued")["status"] == "running"
        kill_process(stack.workers[survivor])  # no need to wait for its first job to finish
