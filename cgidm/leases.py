"""Job leases: who runs a job now, which attempt is current, and which jobs were abandoned.

Why: a worker killed mid-job (SIGKILL, the OOM killer, a lost machine) acknowledges nothing, so
without leases its job waits for the broker's visibility timeout, which must outlast the longest
job (75 min by default). With leases, a running job's worker renews a short lease from a
heartbeat thread (``CGIDM_LEASE_HEARTBEAT``, 10 s); a reaper in every worker and gateway
process (:mod:`cgidm.reaper`) finds leases that lapsed (``CGIDM_LEASE_TTL``, 60 s, without a
heartbeat) and hands the job out again at once, whatever its length.

Attempts are fenced by number. Every task message carries the attempt (``delivery``) it was sent
for: 1 from the gateway, ``n + 1`` from the reaper that found attempt ``n`` lapsed. A worker must
*claim* its attempt before running it and *commit* before writing the job's final record; a
delivery whose attempt was superseded, or whose job has finished, does nothing. The broker's
visibility timeout stays as the last backstop: the message it restores carries an old attempt.

One state machine (:class:`Lease` and the pure functions below) with two ways to apply it
atomically, chosen by the broker, so ``cgidm serve`` and docker-compose run the same code:

- :class:`RedisLeases` (Redis broker): a hash per job plus a sorted set of deadlines to scan,
  changed in one ``WATCH``/``MULTI`` transaction per step (retried on conflict), with Redis
  server time as the clock, so the clocks of the machines never matter;
- :class:`SqliteLeases` (the embedded SQLite broker): one table in
  ``<CGIDM_DATA_DIR>/leases.sqlite``, each step inside ``BEGIN IMMEDIATE``.

States: ``running`` (a worker holds it and renews it), ``committing`` (the worker is writing the
final record), ``retrying`` (a storage retry is waiting to be delivered), ``reaping``/``failing``
(a reaper is handing the job out again, or ending it as poison), ``queued`` (waiting for a
worker), ``done``. A lapse of any state with a deadline is found by the reaper; a reaper that
dies half-way through leaves ``reaping``/``failing`` with a deadline, so another one finishes.

This module is imported by the gateway: no torch, no Celery.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from cgidm.errors import CgidmServiceError
from cgidm.settings import Settings

log = logging.getLogger("cgidm.leases")

LeaseState = Literal["queued", "running", "committing", "retrying", "reaping", "failing", "done"]
#: States whose deadline the reaper watches.
WATCHED: frozenset[str] = frozenset({"running", "committing", "retrying", "reaping", "failing"})
#: How long a reaper may take to hand a job out again before another reaper takes over.
REAP_GRACE = 30.0
#: A finished job's lease is kept this long, so late deliveries still find it finished.
DONE_TTL = 7 * 24 * 3600
#: Redis or SQLite unreachable: how long a lease step keeps trying before giving up.
RETRY_SECONDS = 20.0


class LeaseUnavailable(CgidmServiceError):
    """The lease store (Redis, or the SQLite file) could not be reached for a while."""

    code = "lease_unavailable"


@dataclass
class Lease:
    """One job's lease record."""

    job_id: str
    attempt: int = 1
    state: LeaseState = "queued"
    owner: str = ""
    deadline: float = 0.0
    lapses: int = 0
    pretrained: str = ""
    finetuned: str = ""
    lost_at: float = 0.0

    @property
    def watched(self) -> bool:
        return self.state in WATCHED

    def to_fields(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if k != "job_id"}

    @classmethod
    def from_fields(cls, job_id: str, fields: dict[str, str]) -> Lease:
        return cls(job_id=job_id, attempt=int(fields.get("attempt", 1)),
                   state=fields.get("state", "queued"),  # type: ignore[arg-type]  # written by to_fields
                   owner=fields.get("owner", ""), deadline=float(fields.get("deadline", 0)),
                   lapses=int(fields.get("lapses", 0)), pretrained=fields.get("pretrained", ""),
                   finetuned=fields.get("finetuned", ""),
                   lost_at=float(fields.get("lost_at", 0)))


Verdict = Literal["claimed", "finished", "superseded", "busy"]


@dataclass
class Claim:
    """What a worker got when it claimed an attempt."""

    verdict: Verdict
    job_id: str
    attempt: int
    lapses: int = 0
    current: int = 0  # the attempt the store considers current

    @property
    def ok(self) -> bool:
        return self.verdict == "claimed"


@dataclass
class Reaped:
    """A lapsed lease a reaper now owns: hand ``attempt`` out again, or end the job (fail)."""

    job_id: str
    action: Literal["requeue", "fail"]
    attempt: int
    lapses: int
    pretrained: str = ""
    finetuned: str = ""
    lost_at: float = 0.0


@dataclass
class Step:
    """A transition's outcome: the new record (``None``: unchanged) and what to answer."""

    lease: Lease | None
    answer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# the state machine, as pure functions of (record, now)


def claim_step(lease: Lease | None, job_id: str, attempt: int, worker: str, ttl: float,
               now: float, pair: tuple[str, str]) -> Step:
    if lease is None:  # first delivery (or the store lost its data): nothing to fence against
        new = Lease(job_id, attempt, "running", worker, now + ttl, 0, *pair)
        return Step(new, Claim("claimed", job_id, attempt, 0, attempt))
    if lease.state in ("done", "failing"):  # ended, or being ended as poison by a reaper
        return Step(None, Claim("finished", job_id, attempt, lease.lapses, lease.attempt))
    if attempt < lease.attempt:
        return Step(None, Claim("superseded", job_id, attempt, lease.lapses, lease.attempt))
    held = lease.state in ("running", "committing") and lease.deadline > now
    if attempt == lease.attempt and held and lease.owner != worker:
        return Step(None, Claim("busy", job_id, attempt, lease.lapses, lease.attempt))
    new = replace(lease, attempt=attempt, state="running", owner=worker, deadline=now + ttl,
                  pretrained=pair[0] or lease.pretrained, finetuned=pair[1] or lease.finetuned)
    return Step(new, Claim("claimed", job_id, attempt, lease.lapses, attempt))


def _held_by(lease: Lease | None, attempt: int, worker: str, states: tuple[str, ...]) -> bool:
    return lease is not None and lease.attempt == attempt and lease.owner == worker and \
        lease.state in states


def renew_step(lease: Lease | None, job_id: str, attempt: int, worker: str, ttl: float,
               now: float) -> Step:
    if lease is None:  # the store lost its data (Redis restarted empty): hold it again
        return Step(Lease(job_id, attempt, "running", worker, now + ttl), True)
    if not _held_by(lease, attempt, worker, ("running", "committing")):
        return Step(None, False)
    assert lease is not None
    return Step(replace(lease, deadline=now + ttl), True)


def commit_step(lease: Lease | None, attempt: int, worker: str, ttl: float, now: float) -> Step:
    """The worker is about to write the job's final record: only if its attempt is current."""
    if lease is None:  # no fencing data (store emptied): the record's own check decides
        return Step(None, True)
    if not _held_by(lease, attempt, worker, ("running", "committing", "retrying")):
        return Step(None, False)
    return Step(replace(lease, state="committing", deadline=now + ttl), True)


def done_step(lease: Lease | None, attempt: int) -> Step:
    if lease is None or lease.attempt > attempt or lease.state == "done":
        return Step(None, False)
    return Step(replace(lease, state="done", deadline=0.0), True)


def release_step(lease: Lease | None, attempt: int, worker: str) -> Step:
    """A warm shutdown puts the job back to the queue with the same attempt."""
    if not _held_by(lease, attempt, worker, ("running", "committing", "retrying")):
        return Step(None, False)
    assert lease is not None
    return Step(replace(lease, state="queued", owner="", deadline=0.0), True)


def hold_step(lease: Lease | None, attempt: int, worker: str, seconds: float,
              now: float) -> Step:
    """A storage retry is waiting (Celery re-sends the same attempt after a back-off)."""
    if not _held_by(lease, attempt, worker, ("running", "committing", "retrying")):
        return Step(None, False)
    assert lease is not None
    return Step(replace(lease, state="retrying", deadline=now + seconds), True)


def reap_step(lease: Lease | None, now: float, max_attempts: int, reaper: str) -> Step:
    """Take over a lapsed lease, atomically: only one reaper gets a :class:`Reaped`."""
    if lease is None or not lease.watched or lease.deadline > now:
        return Step(None, None)
    if lease.state in ("reaping", "failing"):  # a reaper died half-way: finish its work
        action: Literal["requeue", "fail"] = "fail" if lease.state == "failing" else "requeue"
        new = replace(lease, owner=reaper, deadline=now + REAP_GRACE)
        return Step(new, Reaped(lease.job_id, action, lease.attempt, lease.lapses,
                                lease.pretrained, lease.finetuned, lease.lost_at))
    lapses = lease.lapses + 1
    if lapses >= max_attempts:
        new = replace(lease, state="failing", owner=reaper, deadline=now + REAP_GRACE,
                      lapses=lapses, lost_at=now)
        return Step(new, Reaped(lease.job_id, "fail", lease.attempt, lapses, lease.pretrained,
                                lease.finetuned, now))
    new = replace(lease, attempt=lease.attempt + 1, state="reaping", owner=reaper,
                  deadline=now + REAP_GRACE, lapses=lapses, lost_at=now)
    return Step(new, Reaped(lease.job_id, "requeue", new.attempt, lapses, lease.pretrained,
                            lease.finetuned, now))


def settle_step(lease: Lease | None, reaped: Reaped, reaper: str) -> Step:
    """The reaper handed the job out (or ended it): stop watching, unless a worker already
    claimed the new attempt."""
    if lease is None or lease.attempt != reaped.attempt or lease.owner != reaper:
        return Step(None, False)
    if lease.state == "reaping":
        return Step(replace(lease, state="queued", owner="", deadline=0.0), True)
    if lease.state == "failing":
        return Step(replace(lease, state="done", deadline=0.0), True)
    return Step(None, False)


# ------------------------------------------------------------------------------------------
# stores


class LeaseStore:
    """Applies the steps atomically; subclasses say how (Redis or SQLite)."""

    def __init__(self, settings: Settings):
        self.ttl = settings.lease_ttl
        self.max_attempts = settings.max_attempts

    # -- backend hooks
    def _apply(self, job_id: str, step: Callable[[Lease | None, float], Step]) -> Step:
        raise NotImplementedError

    def lapsed(self, limit: int = 100) -> list[str]:
        """Ids of jobs whose watched deadline has passed (candidates; reap() decides)."""
        raise NotImplementedError

    def get(self, job_id: str) -> Lease | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""

    # -- retried calls
    def _call(self, job_id: str, step: Callable[[Lease | None, float], Step]) -> Step:
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            try:
                return self._apply(job_id, step)
            except LeaseUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - connection errors of either backend
                if not self._transient(exc) or time.monotonic() > deadline:
                    raise LeaseUnavailable(f"lease store unreachable: {exc}") from exc
                time.sleep(0.5)

    def _transient(self, exc: Exception) -> bool:
        return isinstance(exc, OSError | sqlite3.OperationalError)

    # -- the operations
    def claim(self, job_id: str, attempt: int, worker: str,
              pair: tuple[str, str] = ("", "")) -> Claim:
        return self._call(job_id, lambda lease, now: claim_step(
            lease, job_id, attempt, worker, self.ttl, now, pair)).answer

    def renew(self, job_id: str, attempt: int, worker: str) -> bool:
        return self._call(job_id, lambda lease, now: renew_step(
            lease, job_id, attempt, worker, self.ttl, now)).answer

    def commit(self, job_id: str, attempt: int, worker: str) -> bool:
        return self._call(job_id, lambda lease, now: commit_step(
            lease, attempt, worker, self.ttl, now)).answer

    def done(self, job_id: str, attempt: int) -> bool:
        return self._call(job_id, lambda lease, now: done_step(lease, attempt)).answer

    def release(self, job_id: str, attempt: int, worker: str) -> bool:
        return self._call(job_id, lambda lease, now: release_step(lease, attempt, worker)).answer

    def hold(self, job_id: str, attempt: int, worker: str, seconds: float) -> bool:
        return self._call(job_id, lambda lease, now: hold_step(
            lease, attempt, worker, seconds, now)).answer

    def reap(self, job_id: str, reaper: str) -> Reaped | None:
        return self._call(job_id, lambda lease, now: reap_step(
            lease, now, self.max_attempts, reaper)).answer

    def settle(self, reaped: Reaped, reaper: str) -> bool:
        return self._call(reaped.job_id, lambda lease, now: settle_step(
            lease, reaped, reaper)).answer


class RedisLeases(LeaseStore):
    """Leases in the broker's Redis: ``<queue>.lease.<job id>`` hashes and the sorted set
    ``<queue>.leases`` (member: job id, score: deadline in Redis server time)."""

    def __init__(self, settings: Settings, url: str | None = None):
        import redis

        super().__init__(settings)
        self.prefix = f"{settings.queue}.lease."
        self.index = f"{settings.queue}.leases"
        self.client = redis.Redis.from_url(url or settings.resolved_broker_url,
                                           socket_timeout=5, socket_connect_timeout=5)

    def _transient(self, exc: Exception) -> bool:
        import redis

        return isinstance(exc, redis.ConnectionError | redis.TimeoutError) or \
            super()._transient(exc)

    def _key(self, job_id: str) -> str:
        return self.prefix + job_id

    @staticmethod
    def _decode(raw: object) -> dict[str, str]:
        # the client is made without decode_responses, so redis answers a hash as bytes: bytes
        return {k.decode(): v.decode() for k, v in cast("dict[bytes, bytes]", raw).items()}

    def _now(self, pipe: Any) -> float:
        seconds, micros = pipe.time()
        return seconds + micros / 1e6

    def get(self, job_id: str) -> Lease | None:
        raw = self._decode(self.client.hgetall(self._key(job_id)))
        return Lease.from_fields(job_id, raw) if raw else None

    def _apply(self, job_id: str, step: Callable[[Lease | None, float], Step]) -> Step:
        import redis

        key = self._key(job_id)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = self._decode(pipe.hgetall(key))
                    now = self._now(pipe)
                    result = step(Lease.from_fields(job_id, raw) if raw else None, now)
                    pipe.multi()
                    if result.lease is not None:
                        # redis's stubs type the mapping's keys invariantly; str keys are what
                        # it takes
                        pipe.hset(key, mapping=result.lease.to_fields())  # type: ignore[arg-type]
                        if result.lease.watched:
                            pipe.zadd(self.index, {job_id: result.lease.deadline})
                            pipe.persist(key)
                        else:
                            pipe.zrem(self.index, job_id)
                            if result.lease.state == "done":
                                pipe.expire(key, DONE_TTL)
                    pipe.execute()  # fails with WatchError if another process changed the key
                    return result
                except redis.WatchError:
                    continue

    def lapsed(self, limit: int = 100) -> list[str]:
        seconds, micros = self.client.time()
        now = seconds + micros / 1e6
        # members come back as bytes: the client is made without decode_responses
        return [m.decode() for m in cast("list[bytes]", self.client.zrangebyscore(
                self.index, "-inf", now, start=0, num=limit))]

    def close(self) -> None:
        self.client.close()


class SqliteLeases(LeaseStore):
    """Leases of the embedded service in ``<CGIDM_DATA_DIR>/leases.sqlite`` (one machine, so
    its clock is the clock)."""

    def __init__(self, settings: Settings, path: Path | None = None):
        super().__init__(settings)
        self.path = path or settings.data_dir / "leases.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS leases (job_id TEXT PRIMARY KEY, "
                       "fields TEXT NOT NULL, deadline REAL, expires REAL)")
            db.execute("CREATE INDEX IF NOT EXISTS leases_deadline ON leases (deadline)")

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            self._local.db = db
        return db

    def get(self, job_id: str) -> Lease | None:
        import json

        row = self._connect().execute("SELECT fields FROM leases WHERE job_id = ?",
                                      (job_id,)).fetchone()
        return Lease.from_fields(job_id, json.loads(row[0])) if row else None

    def _apply(self, job_id: str, step: Callable[[Lease | None, float], Step]) -> Step:
        import json

        db = self._connect()
        db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes
        try:
            now = time.time()
            db.execute("DELETE FROM leases WHERE expires IS NOT NULL AND expires < ?", (now,))
            row = db.execute("SELECT fields FROM leases WHERE job_id = ?", (job_id,)).fetchone()
            result = step(Lease.from_fields(job_id, json.loads(row[0])) if row else None, now)
            if result.lease is not None:
                new = result.lease
                db.execute(
                    "INSERT OR REPLACE INTO leases (job_id, fields, deadline, expires) "
                    "VALUES (?, ?, ?, ?)",
                    (job_id, json.dumps(new.to_fields()), new.deadline if new.watched else None,
                     now + DONE_TTL if new.state == "done" else None))
            db.execute("COMMIT")
            return result
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def lapsed(self, limit: int = 100) -> list[str]:
        rows = self._connect().execute(
            "SELECT job_id FROM leases WHERE deadline IS NOT NULL AND deadline <= ? "
            "ORDER BY deadline LIMIT ?", (time.time(), limit)).fetchall()
        return [row[0] for row in rows]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def lost_worker_message(settings: Settings, reaped: Reaped, *, running: str, gave_up: str,
                        goes_on: str) -> str:
    """What a job's or an audit group's record says after its lease lapsed (the reaper writes
    it): how often the worker running ``running`` was lost and why that happens, then
    ``gave_up`` (after the last attempt) or ``goes_on`` (when another attempt is sent)."""
    lost = reaped.lapses
    what = (f"the worker running {running} was lost {lost} time{'s' if lost > 1 else ''} "
            f"(its lease went {settings.lease_ttl:g} s without a heartbeat: the process was "
            "killed, ran out of memory, or its machine went away)")
    if reaped.action == "fail":
        return (f"{what}; after {lost} lost attempts (CGIDM_MAX_ATTEMPTS={settings.max_attempts})"
                f" it is not run again, so it cannot keep crashing workers. {gave_up}")
    return f"{what}; {goes_on}"


def leases_from_settings(settings: Settings) -> LeaseStore | None:
    """The lease store that goes with the broker: Redis with Redis, a SQLite file with the
    embedded SQLite broker; ``None`` (no leases: the visibility timeout alone) otherwise."""
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        return RedisLeases(settings)
    if settings.embedded_broker:
        return SqliteLeases(settings)
    log.warning("no job leases with broker %s: a job whose worker dies waits for the broker to "
                "redeliver it", url.split("://", 1)[0])
    return None
