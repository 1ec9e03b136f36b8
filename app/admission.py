"""Admission to the job queue: CGIDM_MAX_QUEUE_DEPTH holds under concurrent submissions.

The gateway decides whether to take a submission before it reads the body, but enqueues the job
only after the upload is read, checked and stored, seconds later for large images. Comparing the
queue's depth with the limit at admission alone therefore let every submission that arrived in
that window through (measured: 53 queued jobs against a limit of 40 with 16 clients). So a
submission holds a *reservation* from admission until its request ends (by then its job is in
the queue, or it was refused), and admission counts waiting jobs plus reservations.

Adding a reservation and counting the reservations is one atomic step (a Redis transaction, or
a lock), so concurrent submissions are ordered: each counts those before it and itself, and of n
submissions racing for k free places exactly k get in. A job that is already enqueued but whose
request has not yet ended counts twice for a moment, which can only refuse a submission at the
border, never admit one past it. The gateway gives the place back when its answer starts
(``app/limits.py``), so only a submission racing that instant can meet the double count; a
client that waits for its 202 before sending the next one never does.

Where reservations live depends on the broker, because every gateway process must see them:
- Redis (the deployed service, any number of gateways): a sorted set in the broker's Redis, one
  member per reservation scored with its expiry, so a gateway that dies mid-upload frees its
  places after ``RESERVATION_TTL`` seconds;
- the embedded SQLite broker (``cgidm serve``: one gateway process): a set in memory.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from cgidm.errors import CgidmServiceError
from cgidm.job_queue import broker_errors

if TYPE_CHECKING:
    import redis

#: Seconds after which a reservation whose gateway never released it stops counting. Longer
#: than any upload the body limits allow on a slow link; short enough that a crashed gateway
#: does not shrink the queue for long.
RESERVATION_TTL = 900

DepthFn = Callable[[], int]


class QueueFull(CgidmServiceError):
    """The queue holds (or is about to hold) ``limit`` jobs; the caller should retry later."""

    code, http_status = "queue_full", 429

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"{waiting} jobs are waiting or being submitted (limit {limit})")
        self.waiting = waiting
        self.limit = limit


class Admission(Protocol):
    def reserve(self, depth: DepthFn, limit: int) -> str:
        """Hold a place for one submission, or raise :class:`QueueFull`; ``depth()`` reads the
        broker (its exceptions propagate, with nothing left reserved)."""

    def release(self, token: str) -> None:
        """Give the place back once the request has ended (enqueued or not)."""

    def pending(self) -> int:
        """Reservations held now (for /metrics)."""


class _Reservations:
    """Reserve-then-count, shared by both stores; a store says how to add and drop one."""

    def _add(self, token: str) -> int:
        """Add ``token`` and return how many reservations are held, atomically."""
        raise NotImplementedError

    def release(self, token: str) -> None:
        raise NotImplementedError

    def reserve(self, depth: DepthFn, limit: int) -> str:
        token = uuid.uuid4().hex
        pending = self._add(token)  # this one included
        try:
            waiting = depth()
        except BaseException:
            self.release(token)
            raise
        if waiting + pending > limit:
            self.release(token)
            raise QueueFull(waiting + pending - 1, limit)
        return token


class LocalAdmission(_Reservations):
    """Reservations of one gateway process (the embedded broker allows only one gateway)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[str] = set()

    def _add(self, token: str) -> int:
        with self._lock:
            self._held.add(token)
            return len(self._held)

    def release(self, token: str) -> None:
        with self._lock:
            self._held.discard(token)

    def pending(self) -> int:
        with self._lock:
            return len(self._held)


class RedisAdmission(_Reservations):
    """Reservations shared by every gateway through the broker's Redis (see the module doc)."""

    def __init__(self, client: redis.Redis, key: str, ttl: float = RESERVATION_TTL) -> None:
        self.client = client
        self.key = key
        self.ttl = ttl

    def _add(self, token: str) -> int:
        now = time.time()
        with broker_errors():
            pipe = self.client.pipeline(transaction=True)
            pipe.zremrangebyscore(self.key, "-inf", now)  # reservations of gateways that died
            pipe.zadd(self.key, {token: now + self.ttl})
            pipe.expire(self.key, int(self.ttl) + 60)
            pipe.zcard(self.key)
            return int(pipe.execute()[-1])

    def release(self, token: str) -> None:
        with broker_errors():
            self.client.zrem(self.key, token)

    def pending(self) -> int:
        with broker_errors():
            return int(self.client.zcount(self.key, time.time(), "+inf"))


def admission_for(broker_url: str, queue: str) -> Admission:
    """Shared reservations on a Redis broker, in-process ones otherwise."""
    if broker_url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(broker_url, socket_timeout=3, socket_connect_timeout=3)
        return RedisAdmission(client, key=f"cgidm:admissions:{queue}")
    return LocalAdmission()
