"""Prometheus metrics computed from the shared state, not from one process's memory.

The gateway and the workers are separate processes, possibly on separate machines, so counters
kept in a process would show only that process's share (or nothing, for the workers). Instead,
each scrape reads the sources of truth every process shares:

- jobs by state and the job-duration histogram: the job records in storage (terminal records
  never change, so they are read once and remembered);
- queue depth: the broker itself (messages waiting in the job queue);
- model-cache hits/misses: the counters each worker process writes to ``workers/<id>.json`` in
  storage after every job, summed over workers.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from app.services import Services
from cgidm.job_queue import BrokerUnavailable
from cgidm.jobs import JobNotFound
from cgidm.storage import StorageError

log = logging.getLogger("cgidm.gateway.metrics")

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


class JobScan:
    """Jobs by state and durations of finished jobs, re-reading only jobs still in flight."""

    def __init__(self, services: Services):
        self.services = services
        self._final: dict[str, tuple[str, float | None]] = {}
        self._lock = threading.Lock()
        #: Jobs waiting to run again after their worker was lost (at the last scan).
        self.recovering = 0

    def scan(self) -> tuple[Counter[str], list[tuple[str, float]]]:
        store = self.services.store
        with self._lock:
            states: Counter[str] = Counter()
            durations: list[tuple[str, float]] = []
            recovering = 0
            ids = store.list_job_ids()
            for job_id in ids:
                if job_id not in self._final:
                    try:
                        record = store.load(job_id)
                    except JobNotFound:  # being created right now: inputs before job.json
                        continue
                    if record.terminal:
                        self._final[job_id] = (record.status, record.duration_seconds)
                    else:
                        state = record.status
                        if state == "queued" and store.cancel_requested(job_id):
                            state = "cancelled"
                        states[state] += 1
                        recovering += record.recovering
                        continue
                status, duration = self._final[job_id]
                states[status] += 1
                if duration is not None:
                    durations.append((status, duration))
            for gone in set(self._final) - set(ids):
                del self._final[gone]
            self.recovering = recovering
            return states, durations


class ServiceCollector(Collector):
    def __init__(self, services: Services):
        self.services = services
        self.jobs = JobScan(services)

    def collect(self) -> Iterator[Metric]:
        yield from self._job_metrics()
        yield from self._broker_metrics()
        yield from self._worker_metrics()

    def _job_metrics(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("cgidm_storage_up", "1 if storage answered this scrape")
        try:
            states, durations = self.jobs.scan()
        except StorageError as exc:
            log.warning("metrics: storage unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("cgidm_jobs", "Jobs by state (from the job records)",
                                 labels=["state"])
        for state in STATES:
            jobs.add_metric([state], states.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("cgidm_jobs_recovering", "Queued jobs waiting to run again "
                                "after their worker was lost (lease lapsed)",
                                value=self.jobs.recovering)
        hist = HistogramMetricFamily(
            "cgidm_job_duration_seconds", "Run time of finished jobs (started to finished)",
            labels=["status"])
        for status in ("succeeded", "failed", "cancelled"):
            values = [d for s, d in durations if s == status]
            buckets = [(_le(b), sum(1 for v in values if v <= b)) for b in DURATION_BUCKETS]
            hist.add_metric([status], buckets, sum_value=sum(values))
        yield hist

    def _broker_metrics(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("cgidm_broker_up", "1 if the broker answered this scrape")
        try:
            depth = self.services.queue_depth()
        except BrokerUnavailable as exc:
            log.warning("metrics: broker unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("cgidm_queue_depth", "Jobs waiting in the broker queue",
                                value=depth)
        try:
            pending = self.services.admission.pending()
        except BrokerUnavailable as exc:
            log.warning("metrics: admissions unknown: %s", exc)
            return
        yield GaugeMetricFamily("cgidm_submissions_in_flight",
                                "Submissions admitted against CGIDM_MAX_QUEUE_DEPTH whose "
                                "request has not ended yet", value=pending)

    def _worker_metrics(self) -> Iterator[Metric]:
        try:
            reports = self.services.store.load_worker_stats()
        except StorageError:
            return
        totals: Counter[str] = Counter()
        disk: Counter[str] = Counter()
        for report in reports:
            for key, value in (report.get("model_cache") or {}).items():
                totals[key] += int(value)
            for key, value in (report.get("disk_cache") or {}).items():
                disk[key] += int(value)
        yield GaugeMetricFamily("cgidm_worker_reports", "Worker processes that wrote counters",
                                value=len(reports))
        for key, help_text in (("hits", "Jobs whose model pair was already loaded"),
                               ("misses", "Jobs that had to load their model pair"),
                               ("evictions", "Model pairs evicted from worker caches")):
            yield CounterMetricFamily(f"cgidm_model_cache_{key}", help_text,
                                      value=totals.get(key, 0))
        yield GaugeMetricFamily("cgidm_model_cache_bytes",
                                "Bytes of model pairs held by the latest report of each worker",
                                value=totals.get("bytes", 0))
        for key, help_text in (("hits", "Uploaded model files found verified in a worker's disk "
                                "cache"),
                               ("downloads", "Uploaded model files fetched from storage"),
                               ("evictions", "Files removed from worker disk caches (budget)"),
                               ("corrupt", "Cached files whose sha256 no longer matched "
                                "(fetched again)")):
            yield CounterMetricFamily(f"cgidm_model_disk_cache_{key}", help_text,
                                      value=disk.get(key, 0))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else str(float(bound))
