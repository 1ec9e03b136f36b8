"""The worker's side of cache-aware routing: which slot queues this process consumes.

The rule itself is in :mod:`cgidm.queue_routing`; this module keeps it true while workers come
and go. A Celery consumer bootstep, :class:`PairRouting`:

- in ``pair`` mode with a Redis broker, it adds this worker to a Redis sorted set of live
  workers (score: expiry in Redis server time, so the clocks of different machines never
  matter) and renews the entry from a heartbeat thread, five times per
  ``CGIDM_ROUTING_MEMBER_TTL``. A thread, because the solo pool runs a job in the event loop's
  own thread and a job may last an hour. Every :data:`REFRESH_SECONDS` the event loop re-reads
  the live workers and adds or cancels slot queues on the consumer to match
  :func:`cgidm.queue_routing.queues_for_member`; the loop owns the consumer, so changes are made in
  its thread, between jobs;
- otherwise (``shared`` mode, or a broker without that set, such as the embedded SQLite file)
  it consumes every queue: the plain one and all slots.

A worker that owns several busy pairs takes its next job from the slot of the job it just
ran, up to :data:`STICKY_STREAK` jobs in a row (:class:`sticky_cycle`), instead of Celery's
default of alternating between its queues, which would swap pairs at every job when its cache
holds fewer pairs than it owns.

A worker that dies stops renewing its entry; ``CGIDM_ROUTING_MEMBER_TTL`` seconds later the
others count without it and take over its slots (a job it held comes back to its slot queue
through the broker's visibility timeout). A warm shutdown removes the entry at once.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from typing import Any, cast

from celery import bootsteps
from celery.utils.log import get_logger
from kombu.utils.scheduling import round_robin_cycle

from cgidm.queue_routing import SLOT_INFIX, all_queues, members_key, queues_for_member, slot_queues
from cgidm.settings import Settings, get_settings

#: A child of Celery's logger, so its INFO lines appear with the worker's ``-l info``.
log = get_logger("cgidm.worker.routing")

#: Seconds between two looks at the set of live workers (at most; a job in the solo pool
#: delays the next look until it ends, which is when a queue change could apply anyway).
REFRESH_SECONDS = 2.0
REDIS_TIMEOUT = 3.0
#: Jobs a worker takes in a row from the slot queue of the pair it has loaded while its other
#: slots also have jobs waiting: more saves loads, fewer bounds how long those others wait.
STICKY_STREAK = 8


def heartbeat_seconds(settings: Settings) -> float:
    """Five heartbeats per ``CGIDM_ROUTING_MEMBER_TTL``: a worker is declared gone only after
    missing several in a row."""
    return settings.routing_member_ttl / 5


def worker_id() -> str:
    """This process's id, as in ``workers/<id>.json`` (host and pid: unique per process)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{socket.gethostname()}-{os.getpid()}")


class Membership:
    """This worker's entry in the Redis set of live workers."""

    def __init__(self, settings: Settings, member: str):
        import redis

        self.key = members_key(settings)
        self.ttl = settings.routing_member_ttl
        self.member = member
        self.client = redis.Redis.from_url(settings.resolved_broker_url,
                                           socket_timeout=REDIS_TIMEOUT,
                                           socket_connect_timeout=REDIS_TIMEOUT)

    def _now(self) -> float:
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    def renew(self) -> None:
        now = self._now()
        pipe = self.client.pipeline()
        pipe.zadd(self.key, {self.member: now + self.ttl})
        pipe.zremrangebyscore(self.key, "-inf", now)  # forget the dead
        pipe.execute()

    def live(self) -> list[str]:
        # members come back as bytes: the client is made without decode_responses
        return sorted(m.decode() for m in cast("list[bytes]", self.client.zrangebyscore(
                      self.key, self._now(), "+inf")))

    def leave(self) -> None:
        self.client.zrem(self.key, self.member)


class Heartbeat(threading.Thread):
    def __init__(self, membership: Membership, interval: float):
        super().__init__(name="cgidm-routing-heartbeat", daemon=True)
        self.membership = membership
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        failing = False
        while not self.stopped.wait(self.interval):
            try:
                self.membership.renew()
                failing = False
            except Exception as exc:  # noqa: BLE001 - Redis away: keep trying, as Celery does
                if not failing:
                    log.warning("routing heartbeat failed (%s); retrying", exc)
                failing = True


class sticky_cycle(round_robin_cycle):  # noqa: N801 - named like kombu's own cycles
    """Order of the queues in the worker's BRPOP (kombu's ``queue_order_strategy``): the queue
    that delivered the last message first, so the loaded pair's jobs run back to back, but
    after :data:`STICKY_STREAK` in a row it goes last, so the other queues get their turn.
    Redis serves BRPOP from the first non-empty key in order."""

    def __init__(self, it: list[str] | None = None):
        super().__init__(it)
        self.last: str | None = None
        self.streak = 0

    def rotate(self, last_used: str) -> str:
        items = self.items
        if last_used not in items:
            return last_used
        self.streak = self.streak + 1 if last_used == self.last else 1
        self.last = last_used
        items.remove(last_used)
        if self.streak < STICKY_STREAK:
            items.insert(0, last_used)
        else:
            items.append(last_used)
            self.streak = 0
        return last_used


def uses_membership(settings: Settings) -> bool:
    return settings.routing == "pair" and \
        settings.resolved_broker_url.startswith(("redis://", "rediss://"))


class PairRouting(bootsteps.StartStopStep):
    """Consumer bootstep: keeps the consumed queues in line with the routing rule."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any):
        super().__init__(c, **kwargs)
        self.settings = get_settings()
        self.member = worker_id()
        self.membership: Membership | None = None
        self.heartbeat: Heartbeat | None = None
        self.timer_entry: Any = None
        self.current: tuple[str, ...] = ()
        self.unreadable = False  # warn once per outage, not at every refresh

    def start(self, c: Any) -> None:
        if not uses_membership(self.settings):
            self._apply(c, all_queues(self.settings), "every queue: no worker set")
            return
        if self.membership is None:
            self.membership = Membership(self.settings, self.member)
        try:
            self.membership.renew()
        except Exception as exc:  # noqa: BLE001 - the heartbeat keeps trying
            log.warning("routing: cannot join the worker set yet (%s)", exc)
        if self.heartbeat is None or not self.heartbeat.is_alive():
            self.heartbeat = Heartbeat(self.membership, heartbeat_seconds(self.settings))
            self.heartbeat.start()
        self._refresh(c)
        refresh = min(REFRESH_SECONDS, self.settings.routing_member_ttl / 4)
        self.timer_entry = c.timer.call_repeatedly(refresh, self._refresh, (c,))

    def _refresh(self, c: Any) -> None:
        assert self.membership is not None
        try:
            members = self.membership.live()
        except Exception as exc:  # noqa: BLE001 - keep the current queues until Redis is back
            if not self.unreadable:
                log.warning("routing: cannot read the worker set (%s); keeping my queues", exc)
            self.unreadable = True
            return
        self.unreadable = False
        wanted = queues_for_member(self.member, members, self.settings)
        n = len(set(members) | {self.member})
        self._apply(c, wanted, f"{n} worker{'s' if n > 1 else ''}")

    def _apply(self, c: Any, wanted: list[str], why: str) -> None:
        if tuple(wanted) == self.current:
            return
        consumed = {q.name for q in c.task_consumer.queues}
        for name in wanted:
            if name not in consumed:
                c.add_task_queue(name)
        for name in consumed - set(wanted):
            c.cancel_task_queue(name)
        self.current = tuple(wanted)
        slot_names = set(slot_queues(self.settings))
        slots = [q.rsplit(SLOT_INFIX, 1)[1] for q in wanted if q in slot_names]
        log.info("cgidm routing: worker %s consumes slots [%s] of %d (%s)", self.member,
                 ",".join(slots), self.settings.routing_slots, why)
        if not slots:
            log.warning("cgidm routing: this worker owns no slot (more workers than "
                        "CGIDM_ROUTING_SLOTS=%d): it only serves the plain queue",
                        self.settings.routing_slots)

    def stop(self, c: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        self.current = ()  # a restarted consumer starts from its configured queues

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self.heartbeat is not None:
            self.heartbeat.stopped.set()
        if self.membership is not None:
            try:
                self.membership.leave()  # the others take over my slots at their next refresh
            except Exception as exc:  # noqa: BLE001 - they will after the TTL anyway
                log.warning("routing: could not leave the worker set (%s)", exc)


def install(app: Any) -> None:
    """Add the bootstep to a Celery app (``worker/celery_app.py``), and with pair routing on
    Redis, the sticky queue order."""
    app.steps["consumer"].add(PairRouting)
    if uses_membership(get_settings()):
        app.conf.broker_transport_options = {
            **(app.conf.broker_transport_options or {}),
            "queue_order_strategy": f"{__name__}:sticky_cycle",
        }
