"""The Celery task: one task per attempt of a job; its arguments the job id and the attempt
number (which fences deliveries, see cgidm/leases.py). This module also starts the worker's
reaper thread (cgidm/reaper.py) when the worker is ready, and stops it when it shuts down."""

from __future__ import annotations

import contextlib
import logging
import time

from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from cgidm.job_queue import AUTHENTICATE_TASK
from cgidm.jobs import JobError, JobNotFound
from cgidm.settings import get_settings
from cgidm.storage import StorageError, StorageUnavailable
from worker.celery_app import celery_app
from worker.context import get_context
from worker.job_runner import SHUTDOWN, JobInterrupted, finish, run_job
from worker.leasing import LeaseKeeper

log = logging.getLogger("cgidm.worker")

_SETTINGS = get_settings()
MAX_RETRIES = _SETTINGS.storage_retries


@worker_shutting_down.connect
def _on_shutdown(**_: object) -> None:
    """A warm shutdown (SIGTERM, Ctrl-C) interrupts the running job within a few PGD steps and
    requeues it, instead of keeping the worker alive until a long job ends. The signal comes
    in the worker's main process, where the solo pool runs tasks; a prefork child never sees
    it and finishes its job before the worker exits."""
    SHUTDOWN.set()


_REAPER: list[object] = []


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    """Every worker also hands out again the jobs of workers that were lost (cgidm/reaper.py)."""
    from cgidm.reaper import start_reaper

    reaper = start_reaper(_SETTINGS, get_context().store, "worker")
    if reaper is not None:
        _REAPER.append(reaper)


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    for reaper in _REAPER:
        reaper.stop()  # type: ignore[attr-defined]  # start_reaper's Reaper; cgidm.reaper loads lazily


@celery_app.task(
    name=AUTHENTICATE_TASK,
    bind=True,
    autoretry_for=(StorageUnavailable,),
    retry_backoff=_SETTINGS.storage_retry_backoff,
    retry_backoff_max=_SETTINGS.storage_retry_backoff_max,
    retry_jitter=True,
    max_retries=MAX_RETRIES,
)
def authenticate_job(self: Task, job_id: str, attempt: int | None = None) -> str:
    """Run the job; storage outages are retried with exponential backoff (the job starts over),
    and when the retries are spent the job is marked failed with ``storage_unavailable``.

    If even that record cannot be written, the message goes back to the queue after a pause
    rather than being acknowledged: a job is never left looking queued or running forever.
    """
    ctx = get_context()
    try:
        return run_job(ctx, job_id, attempt)
    except JobInterrupted as exc:
        raise Reject(str(exc), requeue=True) from exc
    except StorageUnavailable as exc:
        if self.request.retries < MAX_RETRIES:
            log.warning("job %s: storage unavailable (%s); retry %d of %d", job_id, exc,
                        self.request.retries + 1, MAX_RETRIES)
            raise
        log.error("job %s: storage still unavailable after %d retries", job_id, MAX_RETRIES)
        try:
            record = ctx.store.load(job_id)
            keeper = LeaseKeeper(ctx.leases, ctx.settings, job_id, attempt or 1, ctx.worker_id)
            if record.terminal:
                keeper.done()
                return record.status
            if not keeper.commit():  # the attempt was handed out again meanwhile
                return "stale"
            finish(ctx, record, "failed", JobError(
                code="storage_unavailable",
                message=f"storage failed {MAX_RETRIES + 1} times while the job ran ({exc}); "
                "submit it again later"))
            keeper.done()
        except JobNotFound:
            return "missing"
        except StorageError as again:
            log.error("job %s: the failure cannot be recorded either (%s); requeueing it",
                      job_id, again)
            time.sleep(min(_SETTINGS.storage_retry_backoff_max, 30))
            raise Reject(f"storage unavailable: {again}", requeue=True) from again
        with contextlib.suppress(StorageError):
            ctx.store.discard_attempts(job_id)
        return "failed"
