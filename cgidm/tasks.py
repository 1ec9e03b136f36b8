"""What the gateway and the worker must agree on about Celery: task names and configuration.

The gateway enqueues by task NAME (``send_task``), so it never imports worker code (or torch);
both sides build their Celery app from :func:`make_celery`, so broker, queue and serializer
cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from cgidm.settings import Settings

#: The one task: authenticate the images of a job. Its only argument is the job id; everything
#: else is read from storage, so messages stay tiny and a redelivered message is harmless.
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


def make_celery(settings: Settings, main: str = "cgidm") -> Any:
    """A configured Celery app (imported lazily so importing this module stays cheap)."""
    from celery import Celery

    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app
