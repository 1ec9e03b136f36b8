"""The job queue (Celery) as the gateway and the worker must agree on it: the task's name, the
Celery configuration, and how a job is enqueued. No task is defined here (``worker/tasks.py``
defines it).

The gateway enqueues by task NAME (``send_task``), so it never imports worker code (or torch);
both sides build their Celery app from :func:`make_celery`, so broker, queue and serializer
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cgidm.errors import CgidmServiceError
from cgidm.settings import Settings


class BrokerUnavailable(CgidmServiceError):
    """The job queue's broker (Redis, or the embedded SQLite file) could not be reached or
    refused an operation: nothing was enqueued, counted or reserved. Worth retrying later; the
    gateway answers 503 ``broker_unavailable``. Its message is the transport's error, as
    ``TypeName: message``."""

    code, http_status = "broker_unavailable", 503


@contextmanager
def broker_errors() -> Iterator[None]:
    """The one place where the transports' exceptions (kombu, redis-py, SQLAlchemy, sockets)
    become :class:`BrokerUnavailable`, as ``cgidm.storage`` does for storage errors.

    Every exception is translated, not a list of known ones: each transport raises its own
    classes, and whatever fails while talking to the broker means the same to a caller, that the
    queue cannot be used right now.
    """
    try:
        yield
    except BrokerUnavailable:
        raise
    except Exception as exc:
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc


#: The one task: authenticate the images of a job. Its arguments are the job id and the attempt
#: number (keyword ``attempt``); everything else is read from storage, so messages stay tiny and
#: a redelivered message is harmless.
AUTHENTICATE_TASK = "cgidm.authenticate"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by both sides (lowercase Celery 4+ names)."""
    transport_options: dict[str, Any] = {}
    if settings.resolved_broker_url.startswith(("redis://", "rediss://")):
        # With late acks, Redis redelivers a message not acked within the visibility timeout:
        # that is how a job survives a worker killed outright (SIGKILL, OOM, lost machine). It
        # must outlast the longest job (the settings enforce > CGIDM_TASK_TIME_LIMIT), or a job
        # still running would be handed to a second worker. kombu looks for such messages every
        # interval x throttle seconds (100 s by default); scanning at a tenth of the timeout
        # (1 to 10 s, one cheap ZRANGE) keeps redelivery close to the timeout itself.
        timeout = settings.resolved_visibility_timeout
        transport_options.update(
            visibility_timeout=timeout,
            unacked_restore_interval=max(1, min(10, timeout // 10)),
            unacked_restore_throttle=1,
        )
    return {
        "broker_url": settings.resolved_broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # results live in storage, not in a Celery backend
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "worker_hijack_root_logger": False,
        # Cancellation goes through storage, so remote control (broadcast) is not needed; the
        # SQLite transport has no broadcast across processes anyway.
        "worker_enable_remote_control": not settings.embedded_broker,
        "worker_send_task_events": False,
    }


#: Publishing to a broker that is down should fail fast (the client gets a 503), not hang.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def enqueue_job(celery: Any, settings: Settings, job_id: str, attempt: int = 1,
                pretrained: str = "", finetuned: str = "") -> None:
    """Send one attempt of a job by task name (the gateway never imports the worker's code).

    Raises :class:`BrokerUnavailable` when the broker cannot take it. The message carries the
    attempt number, which fences deliveries (:mod:`cgidm.leases`): the
    gateway sends attempt 1, the reaper ``n + 1`` after attempt ``n`` was lost. The queue depends
    on the pair with ``CGIDM_ROUTING=pair`` (:mod:`cgidm.queue_routing`).
    """
    from cgidm.queue_routing import queue_for_pair

    with broker_errors():
        celery.send_task(AUTHENTICATE_TASK, args=[job_id], kwargs={"attempt": attempt},
                         task_id=job_id if attempt == 1 else f"{job_id}-a{attempt}",
                         queue=queue_for_pair(pretrained, finetuned, settings),
                         retry=True, retry_policy=PUBLISH_RETRY)


def waiting_jobs(celery: Any, settings: Settings) -> int:
    """Messages waiting in the job queues (plain and slots), read from the broker; raises
    :class:`BrokerUnavailable` when it cannot be asked."""
    from cgidm.queue_routing import queue_depth

    with broker_errors(), celery.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        try:
            return queue_depth(conn, settings)
        finally:
            _end_sql_session(conn)


def _end_sql_session(conn: Any) -> None:
    """Give back the database connection of kombu's SQLAlchemy transport (the embedded default's
    SQLite broker). Its channel opens a Session on first use and never closes it, not even when
    the channel closes, so every count held one pooled connection until the garbage collector
    happened to free the channel; after 15 counts (pool 5 + overflow 10) the next submission
    waited 30 s and was refused as broker_unavailable. Redis channels have no session."""
    session = getattr(getattr(conn, "_default_channel", None), "_session", None)
    if session is not None:
        session.close()


def make_celery(settings: Settings, main: str = "cgidm") -> Any:
    """A configured Celery app (imported lazily so importing this module stays cheap)."""
    from celery import Celery

    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app
