"""The worker's hold on one attempt of a job: claim, heartbeat, commit (see cgidm/leases.py).

The heartbeat is a thread, not a progress hook: the solo pool runs the job in the main thread,
and a model load or one long PGD step may take minutes without reporting progress. The thread
renews the lease every ``CGIDM_LEASE_HEARTBEAT`` seconds; if the store answers that the attempt
is no longer this worker's (a reaper handed it out again after a stall), :attr:`lost` is set
and the job stops at its next cancel check, without writing anything.

While the store cannot be reached, the job goes on: nothing can be reaped then either, and the
commit before the final record checks the attempt again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cgidm.leases import Claim, LeaseStore, LeaseUnavailable
from cgidm.settings import Settings

log = logging.getLogger("cgidm.worker.lease")


class LeaseKeeper:
    """One claimed attempt. With no lease store (``leases`` is None) every call succeeds."""

    def __init__(self, leases: LeaseStore | None, settings: Settings, job_id: str,
                 attempt: int, worker: str):
        self.leases, self.settings = leases, settings
        self.job_id, self.attempt, self.worker = job_id, attempt, worker
        self.lost = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self, pair: tuple[str, str]) -> Claim:
        if self.leases is None:
            return Claim("claimed", self.job_id, self.attempt, 0, self.attempt)
        try:
            return self.leases.claim(self.job_id, self.attempt, self.worker, pair)
        except LeaseUnavailable as exc:  # retried by the task like a storage outage
            from cgidm.storage import StorageUnavailable

            raise StorageUnavailable(f"cannot claim the job's attempt: {exc}") from exc

    def start(self) -> LeaseKeeper:
        if self.leases is not None:
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=f"cgidm-lease-{self.job_id[:8]}")
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _beat(self) -> None:
        assert self.leases is not None
        failing = False
        while not self._stopped.wait(self.settings.lease_heartbeat):
            try:
                held = self.leases.renew(self.job_id, self.attempt, self.worker)
            except Exception as exc:  # noqa: BLE001 - store away: keep working, keep trying
                if not failing:
                    log.warning("job %s: lease not renewed (%s); retrying", self.job_id, exc)
                failing = True
                continue
            failing = False
            if not held and not self._stopped.is_set():
                log.warning("job %s: attempt %d is no longer this worker's (its lease lapsed "
                            "and the job was handed out again); stopping it", self.job_id,
                            self.attempt)
                self.lost.set()
                return

    # -- the ends of an attempt; each is a no-op without a store
    def commit(self) -> bool:
        """May this attempt write the job's final record? False: it was superseded."""
        if self.leases is None:
            return True
        try:
            held = self.leases.commit(self.job_id, self.attempt, self.worker)
        except LeaseUnavailable as exc:
            from cgidm.storage import StorageUnavailable

            raise StorageUnavailable(f"cannot confirm the job's attempt: {exc}") from exc
        if not held:
            self.lost.set()
        return held

    def done(self) -> None:
        self._stopped.set()  # no renewal after the end
        self._quietly("done", lambda s: s.done(self.job_id, self.attempt))

    def release(self) -> None:
        self._quietly("release", lambda s: s.release(self.job_id, self.attempt, self.worker))

    def hold(self, seconds: float) -> None:
        self._quietly("hold", lambda s: s.hold(self.job_id, self.attempt, self.worker, seconds))

    def _quietly(self, what: str, call: Callable[[LeaseStore], object]) -> None:
        """Best effort: if it fails, the lease lapses and a reaper sorts the job out."""
        if self.leases is None:
            return
        try:
            call(self.leases)
        except Exception as exc:  # noqa: BLE001
            log.warning("job %s: lease %s failed (%s); the reaper will settle it", self.job_id,
                        what, exc)
