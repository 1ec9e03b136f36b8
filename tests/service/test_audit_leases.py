"""Audit groups hold leases like jobs (cgidm/audit_leases.py): the same store and reaper, with
short leases (unit level; tests/service/test_worker_loss.py kills a real worker at the defaults).
Real redis-server; the reaper publishes to real Redis queues, read back here."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis

from cgidm.audit_leases import group_lease_id, parse_group_lease_id
from cgidm.audits import (
    AUDIT_GROUP_TASK,
    AuditInput,
    AuditModelSpec,
    AuditRequest,
    AuditStore,
    model_groups,
    new_audit_id,
)
from cgidm.job_queue import make_celery
from cgidm.jobs import JobStore
from cgidm.leases import RedisLeases
from cgidm.reaper import Reaper
from cgidm.settings import Settings
from cgidm.storage import LocalStorage

TTL = 2.0  # the smallest the settings allow


def _settings(tmp_path: Path, redis_url: str, **extra: object) -> Settings:
    return Settings(data_dir=tmp_path, queue=f"al-{uuid.uuid4().hex[:8]}", broker_url=redis_url,
                    lease_ttl=TTL, lease_heartbeat=1, **extra)  # type: ignore[arg-type]


def _audit(store: AuditStore, count: int) -> str:
    audit_id = new_audit_id()
    store.create(AuditRequest(
        audit_id=audit_id, created_at=datetime.now(timezone.utc),
        models=[AuditModelSpec(pretrained="tiny-base", finetuned=f"m{i}") for i in range(count)],
        images=[AuditInput(name="i", key="k", sha256="0")],
        controls=[AuditInput(name="c", key="k2", sha256="0")]), [])
    return audit_id


def test_group_lease_ids_never_look_like_job_ids():
    audit_id = new_audit_id()
    assert parse_group_lease_id(group_lease_id(audit_id, 3)) == (audit_id, 3)
    assert parse_group_lease_id(uuid.uuid4().hex) is None  # a job id
    assert parse_group_lease_id(f"audit-{audit_id}-x") is None


def test_reaper_hands_a_lost_group_out_again_with_only_its_models_not_done(tmp_path, redis_url):
    """Attempt 1 of group 0 claimed, model 0 stored, then its worker is lost: the reaper sends
    attempt 2 of the group with models 1 and 2 only, to the base's queue; the lost attempt is
    superseded. A group of an audit that already has its result is only settled."""
    settings = _settings(tmp_path, redis_url)
    storage = LocalStorage(tmp_path / "store")
    store = AuditStore(storage)
    audit_id, finished = _audit(store, 3), _audit(store, 1)
    store.save_model(audit_id, 0, {"index": 0, "p_value": 1.0})
    store.save_result(finished, {"models": []})
    assert model_groups(store.load_request(audit_id).models) == [("tiny-base", [0, 1, 2])]
    leases = RedisLeases(settings)
    lost, done = group_lease_id(audit_id, 0), group_lease_id(finished, 0)
    for lease in (lost, done):
        assert leases.claim(lease, 1, "dead-worker", ("tiny-base", "tiny-base")).ok
    time.sleep(TTL + 0.3)
    reaper = Reaper(settings, leases, JobStore(storage), make_celery(settings), "test")
    assert sorted(r.job_id for r in reaper.sweep()) == sorted([lost, done])
    messages = redis.Redis.from_url(redis_url).lrange(settings.queue, 0, -1)
    assert len(messages) == 1  # nothing for the finished audit
    message = json.loads(messages[0])
    assert message["headers"]["task"] == AUDIT_GROUP_TASK
    args, kwargs, _ = json.loads(__import__("base64").b64decode(message["body"]))
    assert args == [audit_id, [1, 2]] and kwargs == {"attempt": 2, "group": 0}
    assert leases.claim(lost, 1, "dead-worker").verdict == "superseded"
    assert leases.claim(lost, 2, "w2").ok
    assert leases.get(done).state == "done"


def test_group_that_keeps_killing_workers_ends_the_audit_worker_lost(tmp_path, redis_url):
    settings = _settings(tmp_path, redis_url, max_attempts=1)
    storage = LocalStorage(tmp_path / "store")
    store = AuditStore(storage)
    audit_id = _audit(store, 2)
    leases = RedisLeases(settings)
    assert leases.claim(group_lease_id(audit_id, 0), 1, "dead-worker").ok
    time.sleep(TTL + 0.3)
    Reaper(settings, leases, JobStore(storage), make_celery(settings), "test").sweep()
    error = store.error(audit_id)
    assert error["code"] == "worker_lost" and "CGIDM_MAX_ATTEMPTS=1" in error["message"]
    assert store.status(store.load_request(audit_id))["status"] == "failed"
    assert redis.Redis.from_url(redis_url).llen(settings.queue) == 0
    assert leases.get(group_lease_id(audit_id, 0)).state == "done"


@pytest.fixture(scope="module")
def audit_tasks() -> Any:
    """worker/audit_tasks.py, with what its assembly imports (torch, through the inversion's
    settings): imported once, not inside the first test's duration."""
    import cgidm_core.inversion  # noqa: F401
    import worker.audit_tasks

    return worker.audit_tasks


def _group_ready(audit_tasks: Any, tmp_path: Path, redis_url: str,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    """An audit of two models, both stored, whose group 0 the worker (audit_group, run in this
    process) is about to finish: what is left is committing and assembling."""
    from types import SimpleNamespace

    settings = _settings(tmp_path, redis_url)
    storage = LocalStorage(tmp_path / "store")
    store = AuditStore(storage)
    audit_id = _audit(store, 2)
    for i in range(2):
        store.save_model(audit_id, i, {"index": i, "pretrained": "tiny-base",
                                       "finetuned": f"m{i}", "tier": "screen",
                                       "screen_p_value": 0.5, "p_value": 1.0, "images": []})
    leases = RedisLeases(settings)
    ctx = SimpleNamespace(store=JobStore(storage), settings=settings, leases=leases,
                          worker_id="w1")
    monkeypatch.setattr(audit_tasks, "get_context", lambda: ctx)
    return settings, storage, store, leases, audit_id


def test_a_worker_lost_while_assembling_leaves_no_audit_running_forever(
        audit_tasks, tmp_path, redis_url, monkeypatch):
    """The group that stores an audit's last model assembles ``result.json`` after committing
    its lease (state ``committing``, renewed by the heartbeat). Its worker lost at that moment:
    the lease lapses like a running one, the reaper sends the next attempt of the group with no
    model left to run, and that attempt (worker/audit_tasks.py::audit_group, run here in this
    process on the same store) assembles and signs the result; the lease ends done."""
    from cgidm.result_signing import check_signature, key_set, keys_of_set, load_or_create_key

    settings, storage, store, leases, audit_id = _group_ready(audit_tasks, tmp_path, redis_url,
                                                              monkeypatch)
    lease = group_lease_id(audit_id, 0)
    assert leases.claim(lease, 1, "dead-worker", ("tiny-base", "tiny-base")).ok
    assert leases.commit(lease, 1, "dead-worker")  # then killed before result.json
    assert store.status(store.load_request(audit_id))["status"] == "running"
    time.sleep(TTL + 0.3)
    Reaper(settings, leases, JobStore(storage), make_celery(settings), "test").sweep()
    [raw] = redis.Redis.from_url(redis_url).lrange(settings.queue, 0, -1)
    args, kwargs, _ = json.loads(__import__("base64").b64decode(json.loads(raw)["body"]))
    assert args == [audit_id, []] and kwargs == {"attempt": 2, "group": 0}

    assert audit_tasks.audit_group.run(*args, **kwargs) == "done"
    result = store.result(audit_id)
    assert sorted(m["finetuned"] for m in result["models"]) == ["m0", "m1"]
    assert store.status(store.load_request(audit_id))["status"] == "succeeded"
    key = load_or_create_key(settings.resolved_signing_key)
    assert check_signature(result, keys_of_set(key_set(key))).ok
    assert leases.get(lease).state == "done" and leases.get(lease).attempt == 2
    # the lost attempt's own redelivery (the broker's backstop) does nothing
    assert audit_tasks.audit_group.run(audit_id, [], attempt=1, group=0) == "finished"


def test_an_assembly_that_outlasts_the_lease_is_not_handed_out_again(
        audit_tasks, tmp_path, redis_url, monkeypatch):
    """The heartbeat goes on while the result is assembled: an assembly longer than the lease
    (a large audit's entries read back from storage) leaves nothing for the reaper."""
    import cgidm_core.audit

    settings, storage, store, leases, audit_id = _group_ready(audit_tasks, tmp_path, redis_url,
                                                              monkeypatch)
    decide, reaped = cgidm_core.audit.decide_models, []

    def slow_decide(*args: Any, **kwargs: Any) -> Any:
        time.sleep(TTL + 1.0)
        reaped.extend(Reaper(settings, leases, JobStore(storage), make_celery(settings),
                             "test").sweep())
        return decide(*args, **kwargs)

    monkeypatch.setattr(cgidm_core.audit, "decide_models", slow_decide)
    assert audit_tasks.audit_group.run(audit_id, [], attempt=1, group=0) == "done"
    assert reaped == [] and redis.Redis.from_url(redis_url).llen(settings.queue) == 0
    assert store.result(audit_id) is not None
    assert leases.get(group_lease_id(audit_id, 0)).state == "done"


def test_an_assembly_that_fails_ends_the_audit_failed_with_its_message(
        audit_tasks, tmp_path, redis_url, monkeypatch):
    """Not a lapsed lease handed out again until CGIDM_MAX_ATTEMPTS, then "worker_lost": the
    error that stopped the assembly, at once, and the lease done."""
    import cgidm_core.audit

    _, _, store, leases, audit_id = _group_ready(audit_tasks, tmp_path, redis_url, monkeypatch)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("model 1 has no p_value")

    monkeypatch.setattr(cgidm_core.audit, "decide_models", broken)
    assert audit_tasks.audit_group.run(audit_id, [], attempt=1, group=0) == "failed"
    assert store.error(audit_id) == {"code": "ValueError", "message": "model 1 has no p_value"}
    assert store.status(store.load_request(audit_id))["status"] == "failed"
    assert leases.get(group_lease_id(audit_id, 0)).state == "done"
