"""Leases for audit subtasks: a lost audit group is handed out again like a lost job.

Why: an audit's group subtask keeps Celery's late acknowledgement, but the broker gives a message
whose worker was SIGKILLed back only after its visibility timeout (``CGIDM_VISIBILITY_TIMEOUT``,
75 min by default, longer than the longest task). Audit groups therefore hold a lease in the
same store, through the same state machine and the same reaper as jobs (:mod:`cgidm.leases`,
:mod:`cgidm.reaper`, :class:`worker.leasing.LeaseKeeper`); only the ids and what "hand out
again" means differ:

- the lease id of group ``g`` of audit ``A`` is ``audit-A-g`` (``g``: the group's position in
  :func:`cgidm.audits.model_groups` of the request, which is deterministic), so it never
  collides with a job id (32 hex digits);
- a reaper that finds such a lease lapsed re-sends the group subtask with the next attempt
  number, listing only the group's models not stored yet (the models already done are never
  redone: each is in ``models/NNNN.json``); after ``CGIDM_MAX_ATTEMPTS`` lost attempts the audit
  ends ``failed`` / ``worker_lost`` instead, so a group that kills every worker stops.

The gateway sends the groups itself (:func:`send_audit`): no orchestrating task without a lease
stands between the request and the groups. The broker's redelivery of the old message stays as
the backstop; it carries the old attempt, which the lease refuses. This module is imported by
the gateway: no torch, no Celery worker.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Container
from typing import Any

from cgidm.audits import (
    AUDIT_GROUP_TASK,
    AuditModelSpec,
    AuditNotFound,
    AuditStore,
    model_groups,
)
from cgidm.leases import Reaped, lost_worker_message
from cgidm.settings import Settings

log = logging.getLogger("cgidm.audit_leases")

_LEASE_ID = re.compile(r"^audit-([0-9a-f]{32})-(\d+)$")


def group_lease_id(audit_id: str, group: int) -> str:
    return f"audit-{audit_id}-{group}"


def parse_group_lease_id(lease_id: str) -> tuple[str, int] | None:
    """(audit id, group) of an audit group's lease id; None for a job's."""
    found = _LEASE_ID.match(lease_id)
    return (found.group(1), int(found.group(2))) if found else None


def send_group(celery: Any, settings: Settings, audit_id: str, group: int, base: str,
               indices: list[int], attempt: int = 1) -> None:
    """Publish one attempt of one group, routed by its base (cgidm.queue_routing)."""
    from cgidm.job_queue import PUBLISH_RETRY, broker_errors
    from cgidm.queue_routing import queue_for_pair

    with broker_errors():
        celery.send_task(AUDIT_GROUP_TASK, args=[audit_id, indices],
                         kwargs={"attempt": attempt, "group": group},
                         queue=queue_for_pair(base, base, settings),
                         retry=True, retry_policy=PUBLISH_RETRY)


def send_audit(celery: Any, settings: Settings, models: list[AuditModelSpec],
               audit_id: str, done: Container[int] = ()) -> int:
    """Publish attempt 1 of every group of an audit that has a model not in ``done``; returns
    how many were sent. The gateway calls it at submission (``done`` empty), so no orchestrating
    task stands between the request and the leased groups: a worker lost at any point after a
    group claimed its lease is found by a reaper. Sending a group again is harmless: group
    numbers are deterministic (:func:`cgidm.audits.model_groups`), and the lease refuses an
    attempt 1 of a group that finished (``finished``), was handed out again (``superseded``) or
    runs elsewhere (``busy``)."""
    sent = 0
    for group, (base, indices) in enumerate(model_groups(models)):
        todo = [i for i in indices if i not in done]
        if todo:
            send_group(celery, settings, audit_id, group, base, todo)
            sent += 1
    return sent


def lost_group_message(settings: Settings, reaped: Reaped) -> str:
    return lost_worker_message(
        settings, reaped, running="part of this audit",
        gave_up="The models already done stay stored; a model that kills its worker every time "
                "usually needs more memory than the worker has: audit it on its own or ask for a "
                "larger worker",
        goes_on=f"attempt {reaped.attempt} goes on with the models not done yet")


def hand_out_again(store: AuditStore, celery: Any, settings: Settings, reaped: Reaped) -> str:
    """What a reaper does with a lapsed audit-group lease it won: re-send the group's models not
    stored yet (attempt ``reaped.attempt``), or end the audit ``worker_lost``. Returns what it
    did (for logs and tests); the caller settles the lease afterwards."""
    parsed = parse_group_lease_id(reaped.job_id)
    if parsed is None:
        raise ValueError(f"{reaped.job_id!r} is not an audit group's lease id")
    audit_id, group = parsed
    try:
        request = store.load_request(audit_id)
    except AuditNotFound:
        return "missing"
    if store.result(audit_id) is not None or store.error(audit_id) is not None or \
            store.cancelled(audit_id):
        return "finished"
    if reaped.action == "fail":
        message = lost_group_message(settings, reaped)
        store.save_error(audit_id, "worker_lost", message)
        log.error("audit %s failed: %s", audit_id, message)
        return "failed"
    groups = model_groups(request.models)
    if group >= len(groups):
        log.warning("audit %s has no group %d; forgetting its lease", audit_id, group)
        return "missing"
    base, indices = groups[group]
    done = store.done_models(audit_id)
    todo = [i for i in indices if i not in done]
    send_group(celery, settings, audit_id, group, base, todo, reaped.attempt)
    log.warning("audit %s group %d: attempt %d lost; attempt %d handed out again with %d of "
                "its %d models left", audit_id, group, reaped.attempt - 1, reaped.attempt,
                len(todo), len(indices))
    return "requeued"
