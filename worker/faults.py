"""Fault injection for the tests that need a worker to die the way production workers die.

Enabled only by the environment variable ``CGIDM_TEST_FAULTS``, which no deployment sets and
which is not a service setting (it is absent from :class:`cgidm.settings.Settings`, the docs'
settings table and docker-compose). Value: comma-separated ``name=value`` entries:

- ``sigkill_at_step=N``: the worker process sends itself SIGKILL when a job reports PGD step N
  (as the kernel's out-of-memory killer would: no clean-up, no acknowledgement), on every job
  it runs. A worker started with it makes every job a poison job.
"""

from __future__ import annotations

import os
import signal

ENV = "CGIDM_TEST_FAULTS"


def _parse(value: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in value.split(","):
        name, sep, number = entry.strip().partition("=")
        if name and sep:
            out[name] = int(number)
    return out


_FAULTS = _parse(os.environ.get(ENV, ""))


def on_progress(done: int) -> None:
    """Called with every progress report of a running job."""
    step = _FAULTS.get("sigkill_at_step")
    if step is not None and done >= step:
        os.kill(os.getpid(), signal.SIGKILL)
