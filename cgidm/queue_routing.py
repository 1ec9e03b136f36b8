"""Which queue a job goes to, and which queues a worker consumes: cache-aware routing.

Loading a model pair costs far more than most jobs' first PGD step (tens of seconds and
gigabytes for Stable Diffusion), and each worker keeps the pairs it loaded in an LRU
(``worker/model_cache.py``). With one shared queue, consecutive jobs of the same pair land on
whichever worker is free, so with several workers and pairs each worker ends up loading every
pair. ``CGIDM_ROUTING=pair`` sends every job of a pair to the same place instead:

- the gateway hashes (pretrained id, fine-tuned id) onto one of ``CGIDM_ROUTING_SLOTS`` slot
  queues ``<CGIDM_QUEUE>.slot<k>`` (:func:`queue_for_pair`);
- each slot is consumed by exactly one live worker: slot ``k`` goes to the worker at position
  ``k mod n`` in the sorted list of the ``n`` live workers (:func:`queues_for_worker`). Workers
  find each other through a heartbeat set in Redis (``worker/slot_consumer.py``), so identical
  replicas (``docker compose up --scale worker=4``) need no per-worker configuration, and the
  slots of a worker that dies go to the survivors once its heartbeat expires.

Every worker also consumes the plain queue, and in ``shared`` mode every slot queue, so a job
published under one mode is still run after the operator switches to the other.

The hash is SHA-256, not Python's ``hash()``: that one is salted per process, and the gateway and
every worker must agree on the slot of a pair across processes and machines.

This module is imported by the gateway: no torch, no Celery at import time.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cgidm.settings import Settings

#: ``<CGIDM_QUEUE>.slot<k>``: the queue of slot ``k`` (Redis key of the same name).
SLOT_INFIX = ".slot"


def slot_for_pair(pretrained_id: str, finetuned_id: str, slots: int) -> int:
    """The slot of a pair: stable across processes, machines and Python versions."""
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    digest = hashlib.sha256(f"{pretrained_id}\0{finetuned_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % slots


def slot_queue(settings: Settings, slot: int) -> str:
    return f"{settings.queue}{SLOT_INFIX}{slot}"


def slot_queues(settings: Settings) -> list[str]:
    return [slot_queue(settings, k) for k in range(settings.routing_slots)]


def all_queues(settings: Settings) -> list[str]:
    """Every queue a job may wait in, whatever the routing mode (for queue depth, for declaring
    them up front, and for a worker that serves everything)."""
    return [settings.queue, *slot_queues(settings)]


def queue_for_pair(pretrained_id: str, finetuned_id: str, settings: Settings) -> str:
    """The queue the gateway publishes a job of this pair to."""
    if settings.routing == "shared":
        return settings.queue
    return slot_queue(settings, slot_for_pair(pretrained_id, finetuned_id,
                                              settings.routing_slots))


def owned_slots(worker_index: int, n_workers: int, slots: int) -> list[int]:
    """Slots of the worker at ``worker_index`` among ``n_workers``: ``k`` with ``k % n == i``.

    Modulo, not a hash ring: with few workers and few busy pairs, a ring leaves some workers
    with twice the slots of others; modulo is exactly balanced. Its cost is that adding or
    removing a worker moves most slots, i.e. one extra load per busy pair, once per change.
    """
    if not 0 <= worker_index < n_workers:
        raise ValueError(f"worker_index {worker_index} not in 0..{n_workers - 1}")
    return [k for k in range(slots) if k % n_workers == worker_index]


def queues_for_worker(worker_index: int, n_workers: int, settings: Settings) -> list[str]:
    """The queues the worker at ``worker_index`` (of ``n_workers`` live ones) consumes.

    Always the plain queue; in ``pair`` mode its own slots, in ``shared`` mode all of them.
    """
    if settings.routing == "shared":
        return all_queues(settings)
    slots = owned_slots(worker_index, n_workers, settings.routing_slots)
    return [settings.queue, *(slot_queue(settings, k) for k in slots)]


def queues_for_member(worker_id: str, members: list[str], settings: Settings) -> list[str]:
    """:func:`queues_for_worker` for ``worker_id`` given the ids of the live workers (in any
    order; the worker itself counts as live even if its own heartbeat is not visible yet)."""
    ordered = sorted(set(members) | {worker_id})
    return queues_for_worker(ordered.index(worker_id), len(ordered), settings)


def members_key(settings: Settings) -> str:
    """Redis sorted set of live workers (member: worker id, score: expiry in server time)."""
    return f"{settings.queue}.routing.workers"


def declare_queues(connection: Any, settings: Settings) -> None:
    """Declare every queue once, before several processes race to (the SQLite transport
    creates a queue's row on first use and does not survive two processes doing it at once)."""
    channel = connection.default_channel
    for name in all_queues(settings):
        channel.queue_declare(queue=name)


def queue_depth(connection: Any, settings: Settings) -> int:
    """Messages waiting in all job queues (plain and slots), read from the broker."""
    from kombu.exceptions import ChannelError

    channel = connection.default_channel
    total = 0
    for name in all_queues(settings):
        try:
            total += int(channel.queue_declare(queue=name, passive=True).message_count)
        except ChannelError:  # Redis drops empty lists: a queue never used holds nothing
            continue
    return total
