"""The worker's Celery app: ``celery -A worker.celery_app worker --pool=solo -c 1``.

Configuration comes from :func:`cgidm.job_queue.celery_config` (late acks, prefetch 1, reject on
worker loss, time limits from the settings), the same function the gateway uses.
"""

from __future__ import annotations

from cgidm.job_queue import make_celery
from cgidm.settings import get_settings
from worker.slot_consumer import install as install_routing

celery_app = make_celery(get_settings(), main="worker")
celery_app.conf.imports = ("worker.tasks", "worker.audit_tasks")
install_routing(celery_app)  # which slot queues this worker consumes (worker/slot_consumer.py)

#: ``celery -A worker.celery_app`` looks for an attribute named ``app``.
app = celery_app
