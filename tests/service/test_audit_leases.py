"""Audit groups hold leases like jobs (cgidm/audit_leases.py): the same store and reaper, with
short leases (unit level; tests/service/test_worker_loss.py kills a real worker at the defaults).
Real redis-server; the reaper publishes to real Redis queues, read back here."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

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
