"""Job leases and the reaper against real stores: redis-server, and the SQLite file of the
embedded service. The state machine is the same for both (cgidm/leases.py); these tests drive
each store through it, and race reapers against each other on real Redis."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from cgidm.job_queue import make_celery
from cgidm.jobs import InputFile, JobRecord, JobSettings, JobStore, input_key, new_job_id, utcnow
from cgidm.leases import LeaseStore, RedisLeases, SqliteLeases
from cgidm.reaper import Reaper
from cgidm.settings import Settings
from cgidm.storage import LocalStorage
from cgidm_testkit.processes import png_bytes

TTL = 2.0  # unit level: short leases so a lapse takes seconds (the process tests use defaults)


def _settings(tmp_path: Path, redis_url: str | None, **extra: object) -> Settings:
    queue = f"lease-{uuid.uuid4().hex[:8]}"
    broker = {"broker_url": redis_url} if redis_url else {}
    return Settings(data_dir=tmp_path, queue=queue, lease_ttl=TTL, lease_heartbeat=1,
                    **broker, **extra)  # type: ignore[arg-type]


@pytest.fixture(params=["redis", "sqlite"])
def store_settings(request, tmp_path) -> tuple[LeaseStore, Settings]:
    if request.param == "redis":
        settings = _settings(tmp_path, request.getfixturevalue("redis_url"))
        return RedisLeases(settings), settings
    settings = _settings(tmp_path, None)
    return SqliteLeases(settings), settings


def _lapse() -> None:
    time.sleep(TTL + 0.3)


def test_claim_renew_commit_done(store_settings):
    leases, _ = store_settings
    job = new_job_id()
    claim = leases.claim(job, 1, "w1", ("a", "b"))
    assert claim.ok and claim.attempt == 1
    assert leases.renew(job, 1, "w1")
    assert not leases.renew(job, 1, "w2")  # not w2's
    busy = leases.claim(job, 1, "w2")  # a duplicate delivery while w1 holds it
    assert busy.verdict == "busy"
    assert leases.commit(job, 1, "w1")
    assert leases.done(job, 1)
    assert leases.claim(job, 1, "w3").verdict == "finished"  # late redelivery does nothing
    assert leases.lapsed() == []


@pytest.mark.slow  # waits out real leases: ~7 s per store
def test_lapsed_attempt_is_superseded_then_poison_after_max_attempts(store_settings):
    leases, settings = store_settings
    job = new_job_id()
    assert leases.claim(job, 1, "w1", ("a", "b")).ok
    assert leases.reap(job, "r") is None  # not lapsed yet
    _lapse()
    assert leases.lapsed() == [job]
    reaped = leases.reap(job, "r")
    assert reaped is not None and reaped.action == "requeue" and reaped.attempt == 2
    assert reaped.lapses == 1 and (reaped.pretrained, reaped.finetuned) == ("a", "b")
    assert leases.settle(reaped, "r")
    # the lost worker comes back: its attempt is superseded everywhere
    assert not leases.renew(job, 1, "w1") and not leases.commit(job, 1, "w1")
    assert leases.claim(job, 1, "w1").verdict == "superseded"
    assert leases.claim(job, 2, "w2").ok
    _lapse()
    second = leases.reap(job, "r")
    assert second is not None and second.attempt == 3 and second.lapses == 2
    leases.settle(second, "r")
    assert leases.claim(job, 3, "w3").ok
    _lapse()
    third = leases.reap(job, "r")
    assert third is not None and third.action == "fail" and third.lapses == settings.max_attempts
    assert leases.claim(job, 3, "w4").verdict == "finished"  # being failed: nobody runs it
    assert leases.settle(third, "r")
    assert leases.get(job).state == "done" and leases.lapsed() == []


@pytest.mark.slow  # a reaper process killed mid-pass: ~4 s per store
def test_reaper_that_dies_half_way_is_finished_by_another(store_settings, monkeypatch):
    import cgidm.leases

    leases, _ = store_settings
    monkeypatch.setattr(cgidm.leases, "REAP_GRACE", 1.0)
    job = new_job_id()
    leases.claim(job, 1, "w1")
    _lapse()
    first = leases.reap(job, "r1")  # ... and r1 dies before publishing
    assert first is not None and leases.reap(job, "r2") is None
    time.sleep(1.3)
    again = leases.reap(job, "r2")
    assert again is not None and (again.action, again.attempt, again.lapses) == ("requeue", 2, 1)
    assert not leases.settle(first, "r1") and leases.settle(again, "r2")


def test_storage_retry_hold_and_warm_shutdown_release(store_settings):
    leases, _ = store_settings
    job = new_job_id()
    leases.claim(job, 1, "w1")
    assert leases.hold(job, 1, "w1", 30)
    assert leases.claim(job, 1, "w2").ok  # the retry message, on another worker
    assert leases.release(job, 1, "w2")  # that worker stops warm: back to the queue
    assert leases.lapsed() == []
    assert leases.claim(job, 1, "w3").ok


# ------------------------------------------------------------------------------------------
# reapers racing, with real Redis and real Celery messages


def _queued_job(store: JobStore) -> str:
    job_id = new_job_id()
    key = input_key(job_id, "image", 0, "a")
    record = JobRecord(job_id=job_id, created_at=utcnow(),
                       settings=JobSettings(pretrained="tiny-base", finetuned="tiny-ft"),
                       inputs=[InputFile(name="a", role="image", key=key, width=24, height=20)])
    store.create(record, [(key, png_bytes(3))])
    return job_id


def test_reapers_racing_enqueue_each_lapsed_job_once(tmp_path, redis_url):
    """Eight reapers (own connections, own Celery apps) sweep the same 20 lapsed jobs at once:
    each job gets exactly one new message, for attempt 2, and its record says it recovers."""
    settings = _settings(tmp_path, redis_url)
    store = JobStore(LocalStorage(tmp_path / "store"))
    jobs = [_queued_job(store) for _ in range(20)]
    setup = RedisLeases(settings)
    for job in jobs:
        assert setup.claim(job, 1, "dead-worker", ("tiny-base", "tiny-ft")).ok
    _lapse()
    reapers = [Reaper(settings, RedisLeases(settings), store,
                      make_celery(settings, main=f"r{i}"), f"test{i}") for i in range(8)]
    for i, reaper in enumerate(reapers):
        reaper.reaper = f"reaper-{i}"  # distinct ids, as distinct processes have
    barrier = threading.Barrier(len(reapers))
    taken: dict[str, list] = {}

    def sweep(reaper: Reaper) -> None:
        barrier.wait()
        taken[reaper.reaper] = reaper.sweep()

    threads = [threading.Thread(target=sweep, args=(r,)) for r in reapers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    won = [r.job_id for got in taken.values() for r in got]
    assert sorted(won) == sorted(jobs)  # every job taken over, by exactly one reaper
    assert len(taken) == 8 and sum(1 for got in taken.values() if got) >= 1
    client = redis.Redis.from_url(redis_url)
    assert client.llen(settings.queue) == len(jobs)  # one message per job, no more
    import json

    sent = [json.loads(m) for m in client.lrange(settings.queue, 0, -1)]
    attempts = sorted((m["headers"]["argsrepr"], m["headers"]["kwargsrepr"]) for m in sent)
    assert attempts == sorted((repr([j]), repr({"attempt": 2})) for j in jobs)
    for job in jobs:
        record = store.load(job)
        assert record.status == "queued" and record.recovering
        assert record.recovery.attempt == 2 and record.recovery.lost_attempts == 1
        assert setup.get(job).state in ("queued", "reaping") and setup.get(job).attempt == 2
    assert setup.lapsed() == []


def test_reaper_ends_a_poison_job_and_settles_a_finished_one(tmp_path):
    """Embedded store: a job whose last allowed attempt lapsed ends failed / worker_lost, its
    lost runs' pictures removed; a lapsed job whose record is already final is only settled."""
    settings = _settings(tmp_path, None, max_attempts=1)
    store = JobStore(LocalStorage(tmp_path / "store"))
    leases = SqliteLeases(settings)
    poison, finished = _queued_job(store), _queued_job(store)
    store.storage.put_bytes(f"jobs/{poison}/attempts/a1-0123abcd/artifacts/a/partial.png", b"x")
    record = store.load(finished)
    record.status = "succeeded"
    store.save(record)
    for job in (poison, finished):
        assert leases.claim(job, 1, "dead-worker").ok
    _lapse()
    reaper = Reaper(settings, leases, store, make_celery(settings), "test")
    assert sorted(r.job_id for r in reaper.sweep()) == sorted([poison, finished])
    failed = store.load(poison)
    assert failed.status == "failed" and failed.error.code == "worker_lost"
    assert "lost 1 time" in failed.error.message and "CGIDM_MAX_ATTEMPTS=1" in failed.error.message
    assert store.list_attempts(poison) == []
    assert store.load(finished).status == "succeeded"
    assert leases.get(poison).state == leases.get(finished).state == "done"
    assert leases.lapsed() == [] and reaper.sweep() == []


def test_reaper_resends_an_upload_job_to_the_queue_its_content_hash_chose(tmp_path, redis_url):
    """With pair routing the gateway queues a job on an uploaded model by the file's sha256 (two
    ids of the same bytes share a cached pair); the reaper must send the next attempt by the
    same key, not by the upload's id, or it lands on a worker that does not hold the pair."""
    from cgidm.queue_routing import queue_for_pair

    settings = _settings(tmp_path, redis_url, routing="pair", routing_slots=64)
    store = JobStore(LocalStorage(tmp_path / "store"))
    job = _queued_job(store)
    record = store.load(job)
    record.queue_key = "ab" * 32  # what the gateway routed an upload's job by
    store.save(record)
    by_hash = queue_for_pair("tiny-base", record.queue_key, settings)
    by_id = queue_for_pair("tiny-base", "tiny-ft", settings)
    assert by_hash != by_id  # the test would prove nothing if both keys chose one queue
    leases = RedisLeases(settings)
    assert leases.claim(job, 1, "dead-worker", ("tiny-base", "tiny-ft")).ok
    _lapse()
    reaper = Reaper(settings, leases, store, make_celery(settings, main="r-hash"), "test")
    assert [r.job_id for r in reaper.sweep()] == [job]
    client = redis.Redis.from_url(redis_url)
    assert client.llen(by_hash) == 1 and client.llen(by_id) == 0
