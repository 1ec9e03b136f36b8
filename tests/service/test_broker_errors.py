"""Every way of talking to the broker raises one typed error, BrokerUnavailable, when the broker
is down: publishing a job, counting the queue, reserving a place (cgidm.job_queue.broker_errors
is the one translation)."""

from __future__ import annotations

import pytest

from app.admission import admission_for
from cgidm.job_queue import BrokerUnavailable, enqueue_job, make_celery, waiting_jobs
from cgidm.settings import Settings
from cgidm_testkit.processes import free_port


@pytest.fixture
def down_broker(tmp_path) -> Settings:
    """Settings pointing at a Redis port nothing listens on."""
    return Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0", data_dir=str(tmp_path))


def test_publishing_to_a_down_broker_raises_broker_unavailable(down_broker):
    celery = make_celery(down_broker, main="gateway")
    with pytest.raises(BrokerUnavailable, match="Error") as caught:
        enqueue_job(celery, down_broker, "0" * 32)
    assert caught.value.__cause__ is not None  # the transport's own error is kept


def test_counting_a_down_brokers_queue_raises_broker_unavailable(down_broker):
    with pytest.raises(BrokerUnavailable):
        waiting_jobs(make_celery(down_broker, main="gateway"), down_broker)


def test_reserving_a_place_on_a_down_broker_raises_broker_unavailable(down_broker):
    admission = admission_for(down_broker.resolved_broker_url, down_broker.queue)
    with pytest.raises(BrokerUnavailable):
        admission.reserve(lambda: 0, limit=10)
    with pytest.raises(BrokerUnavailable):
        admission.pending()


def test_counting_the_embedded_queue_gives_its_database_connection_back(tmp_path):
    """The gateway counts the queue before every submission. With the embedded SQLite broker
    each count used to keep one pooled database connection until the garbage collector freed
    it: with the collector idle, the 16th count waited 30 s and failed. Forty counts in a row,
    the collector switched off, at the transport's own pool settings."""
    import gc

    from cgidm.job_queue import make_celery, waiting_jobs
    from cgidm.settings import Settings

    settings = Settings(data_dir=tmp_path)
    celery = make_celery(settings)
    enabled = gc.isenabled()
    gc.disable()
    try:
        assert [waiting_jobs(celery, settings) for _ in range(40)] == [0] * 40
    finally:
        if enabled:
            gc.enable()
