"""The reaper: hands out again the jobs whose worker was lost, or ends them when they keep
killing workers. Audit groups hold leases in the same store and are handed out again by the
same pass (:mod:`cgidm.audit_leases`).

A thread in every worker process and in every gateway process (safe to run in all at once: a
lapsed lease is taken over atomically by exactly one reaper, see :func:`cgidm.leases.reap_step`).
Every ``CGIDM_REAPER_INTERVAL`` seconds it lists the leases whose deadline passed; for each one
it wins it:

- ``requeue``: the record goes back to ``queued`` with ``recovering: true``, its progress reset
  and ``recovery`` saying which attempt is due; then the next attempt is published to the job's
  queue (record first, so the worker that takes the new attempt writes after the reaper);
- ``fail`` (``CGIDM_MAX_ATTEMPTS`` attempts lost): the record ends ``failed`` with code
  ``worker_lost`` and a message that says what happened; the lost runs' pictures are removed.

If the reaper itself dies or storage fails half-way, the lease stays ``reaping``/``failing``
with a short deadline and another pass (of any reaper) does the step again.

This module is imported by the gateway: no torch, no worker code.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from datetime import datetime, timezone
from typing import Any

from cgidm.job_queue import enqueue_job, make_celery
from cgidm.jobs import JobError, JobNotFound, JobRecord, JobStore, Progress, Recovery, utcnow
from cgidm.leases import LeaseStore, Reaped, leases_from_settings, lost_worker_message
from cgidm.settings import Settings
from cgidm.storage import StorageError

log = logging.getLogger("cgidm.reaper")


def reaper_id(role: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{role}-{socket.gethostname()}-{os.getpid()}")


def lost_message(settings: Settings, reaped: Reaped) -> str:
    return lost_worker_message(
        settings, reaped, running="this job",
        gave_up="A job that kills its worker every time usually needs more memory than the "
                "worker has: submit fewer or smaller images or a smaller batch_size, or ask the "
                "operator for a larger worker",
        goes_on=f"attempt {reaped.attempt} (of at most {settings.max_attempts}) waits for a "
                "worker and starts over from the first step")


class Reaper(threading.Thread):
    """Finds lapsed leases and acts on them; see the module docstring."""

    def __init__(self, settings: Settings, leases: LeaseStore, store: JobStore,
                 celery: Any, role: str):
        super().__init__(name=f"cgidm-reaper-{role}", daemon=True)
        self.settings, self.leases, self.store, self.celery = settings, leases, store, celery
        self.reaper = reaper_id(role)
        self.stopped = threading.Event()
        self._failing = False

    def run(self) -> None:
        while not self.stopped.wait(self.settings.reaper_interval):
            try:
                self.sweep()
                self._failing = False
            except Exception as exc:  # noqa: BLE001 - Redis or storage away: try again later
                if not self._failing:
                    log.warning("reaper %s: sweep failed (%s); retrying", self.reaper, exc)
                self._failing = True

    def stop(self) -> None:
        self.stopped.set()

    def sweep(self) -> list[Reaped]:
        """One pass; returns what this reaper took over (for tests and logs)."""
        taken = []
        for job_id in self.leases.lapsed():
            reaped = self.leases.reap(job_id, self.reaper)
            if reaped is None:  # another reaper got it, or it was renewed meanwhile
                continue
            taken.append(reaped)
            try:
                self.handle(reaped)
            except Exception as exc:  # noqa: BLE001 - storage or broker away: a later pass
                log.warning("reaper %s: job %s not handed out yet (%s); retrying in %.0f s",
                            self.reaper, job_id, exc, 30)
        return taken

    def handle(self, reaped: Reaped) -> None:
        from cgidm.audit_leases import hand_out_again, parse_group_lease_id

        if parse_group_lease_id(reaped.job_id) is not None:  # an audit's group, not a job
            from cgidm.audits import AuditStore

            outcome = hand_out_again(AuditStore(self.store.storage), self.celery, self.settings,
                                     reaped)
            if outcome in ("missing", "finished"):
                self.leases.done(reaped.job_id, reaped.attempt)
                return
            self.leases.settle(reaped, self.reaper)
            return
        try:
            record = self.store.load(reaped.job_id)
        except JobNotFound:
            log.warning("job %s has a lease but no record; forgetting it", reaped.job_id)
            self.leases.done(reaped.job_id, reaped.attempt)
            return
        if record.terminal:  # its worker died after writing the final record
            self.leases.done(reaped.job_id, reaped.attempt)
            return
        message = lost_message(self.settings, reaped)
        record.recovery = Recovery(
            attempt=reaped.attempt, lost_attempts=reaped.lapses,
            max_attempts=self.settings.max_attempts,
            lost_at=datetime.fromtimestamp(reaped.lost_at, timezone.utc) if reaped.lost_at
            else utcnow(), message=message)
        if reaped.action == "fail":
            self._fail(record, message)
        else:
            self._requeue(record, reaped)
        self.leases.settle(reaped, self.reaper)

    def _requeue(self, record: JobRecord, reaped: Reaped) -> None:
        record.status = "queued"
        record.recovering = True
        record.started_at = None
        record.progress = Progress()
        self.store.save(record)
        enqueue_job(self.celery, self.settings, record.job_id, reaped.attempt,
                    record.settings.pretrained, record.queue_key or record.settings.finetuned)
        log.warning("job %s: attempt %d lost; attempt %d handed out again (reaper %s)",
                    record.job_id, reaped.attempt - 1, reaped.attempt, self.reaper)

    def _fail(self, record: JobRecord, message: str) -> None:
        record.status = "failed"
        record.recovering = False
        record.finished_at = utcnow()
        record.error = JobError(code="worker_lost", message=message)
        self.store.save(record)
        try:
            self.store.discard_attempts(record.job_id)
        except StorageError as exc:
            log.warning("job %s: pictures of lost runs not removed: %s", record.job_id, exc)
        log.error("job %s failed: %s", record.job_id, message)


def start_reaper(settings: Settings, store: JobStore, role: str) -> Reaper | None:
    """Start a reaper thread for this process; ``None`` where the broker has no leases."""
    leases = leases_from_settings(settings)
    if leases is None:
        return None
    reaper = Reaper(settings, leases, store, make_celery(settings, main=f"reaper-{role}"), role)
    reaper.start()
    log.info("reaper %s: looking for lapsed job leases every %g s", reaper.reaper,
             settings.reaper_interval)
    return reaper
