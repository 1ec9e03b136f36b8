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


def _group_messages(redis_url: str, settings: Settings, bases: list[str]) -> list[tuple[Any, ...]]:
    """(task, args, kwargs) of every message in the queues of ``bases``, in queue order."""
    from cgidm.queue_routing import queue_for_pair

    client, out = redis.Redis.from_url(redis_url), []
    for queue in dict.fromkeys(queue_for_pair(base, base, settings) for base in bases):
        for raw in reversed(client.lrange(queue, 0, -1)):  # kombu pushes to the left
            message = json.loads(raw)
            args, kwargs, _ = json.loads(__import__("base64").b64decode(message["body"]))
            out.append((message["headers"]["task"], args, kwargs))
    return out


@pytest.mark.parametrize("routing", ["shared", "pair"])
def test_the_gateway_sends_the_leased_groups_itself_no_orchestrating_task(tmp_path, redis_url,
                                                                          routing):
    """POST /audits's enqueue step (app/routes_audits.py::_enqueue) publishes attempt 1 of every
    group of cgidm.audits.model_groups, each to its base's queue, and no ``cgidm.audit``: there
    is no unleased step between the request and the groups for a lost worker to strand."""
    from types import SimpleNamespace

    from app.routes_audits import _enqueue
    from cgidm.audits import AUDIT_TASK

    settings = _settings(tmp_path, redis_url, routing=routing)
    store = AuditStore(LocalStorage(tmp_path / "store"))
    audit_id = new_audit_id()
    models = [AuditModelSpec(pretrained="base-a" if i != 4 else "base-b", finetuned=f"m{i}")
              for i in range(10)]
    request = AuditRequest(audit_id=audit_id, created_at=datetime.now(timezone.utc),
                           models=models, images=[AuditInput(name="i", key="k", sha256="0")],
                           controls=[AuditInput(name="c", key="k2", sha256="0")])
    store.create(request, [])
    _enqueue(SimpleNamespace(celery=make_celery(settings), settings=settings), request)
    groups = model_groups(models)
    assert groups == [("base-a", [0, 1, 2, 3, 5, 6, 7, 8]), ("base-a", [9]), ("base-b", [4])]
    sent = _group_messages(redis_url, settings, ["base-a", "base-b"])
    assert sorted(sent, key=lambda m: m[2]["group"]) == [
        (AUDIT_GROUP_TASK, [audit_id, indices], {"attempt": 1, "group": g})
        for g, (_, indices) in enumerate(groups)]
    assert AUDIT_TASK not in {task for task, _, _ in sent}
    if routing == "pair":  # a base's groups go to its slot queue, not the plain one
        assert redis.Redis.from_url(redis_url).llen(settings.queue) == 0


def test_a_group_sent_again_is_refused_by_its_lease(audit_tasks, tmp_path, redis_url,
                                                    monkeypatch):
    """Why sending a group again is harmless (cgidm.audit_leases.send_audit; the former
    orchestrating task's redelivery does it): attempt 1 of a group handed out again as attempt
    2 is ``stale``, and of a group whose lease is done, ``finished``; neither runs a model."""
    settings, storage, store, leases, audit_id = _group_ready(audit_tasks, tmp_path, redis_url,
                                                              monkeypatch)
    lease = group_lease_id(audit_id, 0)
    assert leases.claim(lease, 1, "dead-worker", ("tiny-base", "tiny-base")).ok
    time.sleep(TTL + 0.3)
    [reaped] = Reaper(settings, leases, JobStore(storage), make_celery(settings), "test").sweep()
    assert reaped.attempt == 2
    assert audit_tasks.audit_group.run(audit_id, [0, 1], attempt=1, group=0) == "stale"
    assert leases.get(lease).attempt == 2 and store.result(audit_id) is None
    assert leases.claim(lease, 2, "w2").ok and leases.done(lease, 2)
    assert audit_tasks.audit_group.run(audit_id, [0, 1], attempt=1, group=0) == "stale"
    assert leases.claim(lease, 1, "w3").verdict == "finished"
    assert leases.get(lease).state == "done" and store.result(audit_id) is None


def test_the_former_orchestrating_task_sends_only_the_groups_with_models_left(
        audit_tasks, tmp_path, redis_url, monkeypatch):
    """A ``cgidm.audit`` message queued before an upgrade still runs (worker/audit_tasks.py::
    start_audit): it sends attempt 1 of the groups with a model not stored, and assembles at
    once when every model is stored."""
    settings, _, store, _, audit_id = _group_ready(audit_tasks, tmp_path, redis_url, monkeypatch)
    monkeypatch.setattr(audit_tasks, "celery_app", make_celery(settings))
    other = _audit(store, 10)  # one base: groups [0..7] and [8, 9]
    for i in (8, 9):
        store.save_model(other, i, {"index": i})
    assert audit_tasks.start_audit.run(other) == "sent 1 group(s)"
    assert _group_messages(redis_url, settings, ["tiny-base"]) == [
        (AUDIT_GROUP_TASK, [other, list(range(8))], {"attempt": 1, "group": 0})]
    assert audit_tasks.start_audit.run(audit_id) == "sent 0 group(s)"  # both models stored
    assert store.result(audit_id) is not None
