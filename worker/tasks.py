"""The Celery task: one task per job, its only argument the job id."""

from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_shutting_down

from cgidm.jobs import JobError, JobNotFound
from cgidm.storage import StorageError, StorageUnavailable
from cgidm.tasks import AUTHENTICATE_TASK
from worker.celery_app import celery_app
from worker.context import get_context
from worker.job_runner import SHUTDOWN, JobInterrupted, finish, run_job

log = logging.getLogger("cgidm.worker")

MAX_RETRIES = 5


@worker_shutting_down.connect
def _on_shutdown(**_: object) -> None:
    """A warm shutdown (SIGTERM, Ctrl-C) interrupts the running job within a few PGD steps and
    requeues it, instead of keeping the worker alive until a long job ends. The signal comes
    in the worker's main process, where the solo pool runs tasks; a prefork child never sees
    it and finishes its job before the worker exits."""
    SHUTDOWN.set()


@celery_app.task(
    name=AUTHENTICATE_TASK,
    bind=True,
    autoretry_for=(StorageUnavailable,),
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
    max_retries=MAX_RETRIES,
)
def authenticate_job(self: Task, job_id: str) -> str:
    """Run the job; storage outages are retried with exponential backoff, and when the retries
    are spent the job is marked failed (if storage lets us write that much)."""
    ctx = get_context()
    try:
        return run_job(ctx, job_id)
    except JobInterrupted as exc:
        raise Reject(str(exc), requeue=True) from exc
    except StorageUnavailable as exc:
        if self.request.retries < MAX_RETRIES:
            raise
        log.error("job %s: storage still unavailable after %d retries", job_id, MAX_RETRIES)
        try:
            record = ctx.store.load(job_id)
            finish(ctx, record, "failed", JobError(code="storage_unavailable", message=str(exc)))
        except (StorageError, JobNotFound):
            pass
        return "failed"
