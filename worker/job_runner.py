"""Run one job: read it from storage, authenticate its images, write artifacts and the result.

The worker is the only writer of ``job.json`` once a job is queued. Every way a job can end is a
final record: ``succeeded`` with a result, ``failed`` with ``error {code, message}``, or
``cancelled`` (no artifacts are presented as a result).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgidm.errors import CgidmServiceError
from cgidm.jobs import (
    ARTIFACT_KINDS,
    BASE_RECOVERED,
    ImageScore,
    JobError,
    JobNotFound,
    JobRecord,
    JobResult,
    Progress,
    SetTest,
    artifact_key,
    artifact_links,
    attempts_prefix,
    new_attempt_tag,
    utcnow,
)
from cgidm.model_fetch import ModelFetchError
from cgidm.model_files import ModelFileError
from cgidm.model_refs import looks_like_reference
from cgidm.registry import InvalidModelReference, UnknownModel
from cgidm.storage import StorageError, StorageUnavailable
from cgidm_core.names import DEFAULT_METRIC, FEATURE_METRICS
from worker import faults
from worker.context import WorkerContext
from worker.leasing import LeaseKeeper

if TYPE_CHECKING:  # annotations only: remote_models is imported where a reference is fetched
    from cgidm.registry import ModelEntry
    from cgidm.uploaded_models import UploadedModel
    from worker.remote_models import RemoteModel

log = logging.getLogger("cgidm.worker")

#: Set when the worker process starts a warm shutdown (SIGTERM, Ctrl-C); see worker.tasks.
SHUTDOWN = threading.Event()


class JobInterrupted(CgidmServiceError):
    """The worker is shutting down: the job was put back to ``queued`` and must be requeued."""

    code = "job_interrupted"


class AttemptSuperseded(CgidmServiceError):
    """This attempt's lease lapsed and the job was handed out again: stop, write nothing."""

    code = "attempt_superseded"


class Watch:
    """The progress and cancel hooks handed to the method, both throttled.

    Progress is written at most every ``progress_interval`` seconds; the cancel marker is looked
    up at most every ``cancel_check_interval`` seconds (a HEAD request on S3). The soft time
    limit is enforced here too, so it holds in every Celery pool (solo included), and a warm
    shutdown of the worker interrupts the job so that it goes back to the queue at once.
    """

    def __init__(self, ctx: WorkerContext, record: JobRecord, keeper: LeaseKeeper | None = None):
        self.ctx, self.record = ctx, record
        self.keeper = keeper or LeaseKeeper(None, ctx.settings, record.job_id, 1, ctx.worker_id)
        self.start = time.monotonic()
        self.deadline = self.start + ctx.settings.task_soft_time_limit
        self._last_write = self._last_check = float("-inf")
        self._origin: tuple[float, int] | None = None
        self.reason: str | None = None

    def progress(self, done: int, total: int) -> None:
        faults.on_progress(done)
        if self.keeper.lost.is_set():  # no longer this worker's attempt: write nothing
            return
        now = time.monotonic()
        if done < total and now - self._last_write < self.ctx.settings.progress_interval:
            return
        self._last_write = now
        # Rate from the first report on, so model loading does not inflate the estimate.
        if self._origin is None:
            self._origin = (now, done)
        t0, done0 = self._origin
        eta = (now - t0) / (done - done0) * (total - done) if done > done0 else None
        self.record.progress = Progress(
            fraction=min(1.0, done / total) if total else 0.0,
            steps_done=done,
            steps_total=total,
            eta_seconds=round(eta, 1) if eta is not None else None,
        )
        try:
            self.ctx.store.save(self.record)
        except StorageUnavailable as exc:  # progress is best-effort; the result is not
            log.warning("job %s: progress not written: %s", self.record.job_id, exc)

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if SHUTDOWN.is_set():
            self.reason = "shutdown"
            return True
        if self.keeper.lost.is_set():
            self.reason = "superseded"
            return True
        if now > self.deadline:
            self.reason = "time_limit"
            return True
        if now - self._last_check < self.ctx.settings.cancel_check_interval:
            return False
        self._last_check = now
        try:
            if self.ctx.store.cancel_requested(self.record.job_id):
                self.reason = "cancelled"
                return True
        except StorageUnavailable as exc:
            log.warning("job %s: cancel marker not checked: %s", self.record.job_id, exc)
        return False


class HardLimit:
    """Ends the worker process when a job outlives ``CGIDM_TASK_TIME_LIMIT``.

    The soft limit is checked between PGD steps; this catches what never reaches a step boundary
    (a hung device, a model load that never returns). It records the failure first, so a
    redelivered message finds the job finished and is dropped. Celery's own hard limit does the
    same only in the prefork pool; this one holds in the solo pool the service runs.
    """

    EXIT_CODE = 70

    def __init__(self, ctx: WorkerContext, record: JobRecord, exit: Any = os._exit,
                 keeper: LeaseKeeper | None = None):
        self.ctx, self.record, self.exit, self.keeper = ctx, record, exit, keeper
        self.timer = threading.Timer(ctx.settings.task_time_limit, self._expire)
        self.timer.daemon = True

    def __enter__(self) -> HardLimit:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()

    def _expire(self) -> None:
        limit = self.ctx.settings.task_time_limit
        log.critical("job %s ran past the hard limit (%s s); ending the worker process",
                     self.record.job_id, limit)
        try:
            if self.keeper is None or self.keeper.commit():
                finish(self.ctx, self.record.model_copy(deep=True), "failed", JobError(
                    code="time_limit", message=f"the job was stopped by CGIDM_TASK_TIME_LIMIT "
                    f"({limit} s) without reaching a PGD step; the worker was restarted"))
                if self.keeper is not None:
                    self.keeper.done()
        except Exception:  # noqa: BLE001 - exiting matters more than the record here
            log.exception("job %s: could not record the hard limit", self.record.job_id)
        self.exit(self.EXIT_CODE)


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def finish(ctx: WorkerContext, record: JobRecord, status: str, error: JobError | None) -> str:
    record.status = status  # type: ignore[assignment]  # callers pass JobStatus values
    record.finished_at = utcnow()
    record.error = error
    ctx.store.save(record)
    ctx.outcomes[status] += 1
    try:
        ctx.publish_stats()
    except StorageError as exc:  # counters are best-effort; the record is what matters
        log.warning("worker counters not written: %s", exc)
    return status


def run_job(ctx: WorkerContext, job_id: str, attempt: int | None = None) -> str:
    """Process one attempt of a job to its end; returns the final status, or ``stale`` for a
    delivery that must do nothing (its attempt was superseded, another worker holds it, or the
    job has finished). Raises only for transient storage errors (the Celery task retries those)
    and for a warm shutdown (the message goes back to the queue)."""
    if SHUTDOWN.is_set():  # a message delivered while the worker stops: straight back
        raise JobInterrupted(f"job {job_id} not started: the worker is shutting down")
    attempt = attempt or 1
    try:
        record = ctx.store.load(job_id)
    except JobNotFound:
        log.error("job %s has no job.json; dropping the message", job_id)
        return "missing"
    keeper = LeaseKeeper(ctx.leases, ctx.settings, job_id, attempt, ctx.worker_id)
    if record.terminal:
        log.info("job %s is already %s (redelivered message); skipping", job_id, record.status)
        keeper.done()
        return record.status
    claim = keeper.claim((record.settings.pretrained, record.settings.finetuned))
    if not claim.ok:
        log.warning("job %s: delivery of attempt %d dropped: %s (current attempt %d)", job_id,
                    attempt, claim.verdict, claim.current)
        return "stale"
    keeper.start()
    try:
        return _run_claimed(ctx, record, keeper)
    finally:
        keeper.stop()


def _run_claimed(ctx: WorkerContext, record: JobRecord, keeper: LeaseKeeper) -> str:
    job_id = record.job_id
    watch = Watch(ctx, record, keeper)
    if ctx.store.cancel_requested(job_id):
        return _close(ctx, record, watch, "cancelled",
                      JobError(code="cancelled", message="cancelled before it started"))

    record.status = "running"
    record.started_at = utcnow()
    record.finished_at = None
    record.attempts += 1
    record.recovering = False
    tag = new_attempt_tag(record.attempts)
    record.worker = {"worker_id": ctx.worker_id, "attempt": tag, "delivery": keeper.attempt}
    ctx.store.save(record)
    try:
        with HardLimit(ctx, record, keeper=keeper):
            result = _check_job_images(ctx, record, watch, tag)
    except AttemptSuperseded:
        return _step_back(ctx, record, tag)
    except StorageUnavailable:
        # Retried from the start by the task (same attempt); this run's pictures go when a later
        # run ends. The lease is held until the retry is delivered.
        keeper.hold(ctx.settings.storage_retry_backoff_max + ctx.settings.lease_ttl)
        raise
    except Exception as exc:  # every failure ends the job with a readable error
        try:
            return _fail(ctx, record, watch, exc)
        except AttemptSuperseded:
            return _step_back(ctx, record, tag)
    return _publish(ctx, record, watch, result, tag)


def _step_back(ctx: WorkerContext, record: JobRecord, tag: str) -> str:
    """A superseded attempt: remove its own pictures, leave the record to the current one."""
    log.warning("job %s: run %s stopped, its attempt was superseded", record.job_id, tag)
    try:
        ctx.store.storage.delete_prefix(f"{attempts_prefix(record.job_id)}{tag}/")
    except StorageError as exc:
        log.warning("job %s: pictures of run %s not removed: %s", record.job_id, tag, exc)
    return "stale"


def _publish(ctx: WorkerContext, record: JobRecord, watch: Watch, result: JobResult,
             attempt: str) -> str:
    """Make this run's result the job's, exactly once, and only with all of its pictures.

    ``job.json`` is the commit point: it is written last and names the run (``attempt``) whose
    pictures the gateway serves. If another run of the same job has already committed (a
    redelivered message racing a run thought dead), this run steps back and removes its own
    pictures, so the record never shows two results and pictures never mix.
    """
    job_id = record.job_id
    expected = {artifact_key(job_id, item.name, kind, attempt)
                for item in record.inputs for kind in ARTIFACT_KINDS}
    expected |= {artifact_key(job_id, row.name, BASE_RECOVERED, attempt)
                 for row in (*result.images, *result.controls) if row.artifacts.base_recovered}
    present = set(ctx.store.storage.list(f"{attempts_prefix(job_id)}{attempt}/"))
    if not expected <= present:  # never "succeeded" with pictures missing
        raise StorageUnavailable(f"job {job_id}: {len(expected - present)} of {len(expected)} "
                                 "pictures are missing from storage after writing them")
    if not watch.keeper.commit():  # a reaper handed the job out again: that attempt publishes
        return _step_back(ctx, record, attempt)
    current = ctx.store.load(job_id)
    if current.terminal:
        log.warning("job %s was already %s by another run; discarding run %s",
                    job_id, current.status, attempt)
        ctx.store.storage.delete_prefix(f"{attempts_prefix(job_id)}{attempt}/")
        watch.keeper.done()
        return current.status
    ctx.store.save_result(job_id, result)
    record.result = result
    record.attempt = attempt
    record.progress = Progress(fraction=1.0, steps_done=record.progress.steps_total or 0,
                               steps_total=record.progress.steps_total, eta_seconds=0.0)
    status = finish(ctx, record, "succeeded", None)
    watch.keeper.done()
    _discard_runs(ctx, job_id, keep=attempt)
    return status


def _discard_runs(ctx: WorkerContext, job_id: str, keep: str | None) -> None:
    """Remove the pictures of unpublished runs (best effort: they are never served anyway)."""
    try:
        ctx.store.discard_attempts(job_id, keep=keep)
    except StorageError as exc:
        log.warning("job %s: pictures of earlier runs not removed: %s", job_id, exc)


def _close(ctx: WorkerContext, record: JobRecord, watch: Watch, status: str,
           error: JobError) -> str:
    """End the job without a result, unless another run of it has already ended it or its
    attempt was superseded."""
    if not watch.keeper.commit():
        tag = (record.worker or {}).get("attempt")
        return _step_back(ctx, record, tag) if tag else "stale"
    try:
        current = ctx.store.load(record.job_id)
    except JobNotFound:
        current = None
    if current is not None and current.terminal:
        _discard_runs(ctx, record.job_id, keep=current.attempt)
        watch.keeper.done()
        return current.status
    status = finish(ctx, record, status, error)
    watch.keeper.done()
    _discard_runs(ctx, record.job_id, keep=None)
    return status


def _fail(ctx: WorkerContext, record: JobRecord, watch: Watch, exc: Exception) -> str:
    status, error = _classify(ctx, record, watch, exc)
    return _close(ctx, record, watch, status, error)


def _classify(ctx: WorkerContext, record: JobRecord, watch: Watch,
              exc: Exception) -> tuple[str, JobError]:
    """The final status and error code of a run that raised ``exc``."""
    from celery.exceptions import SoftTimeLimitExceeded

    from cgidm_core.errors import Cancelled, CGIDMError

    limit = ctx.settings.task_soft_time_limit
    if isinstance(exc, Cancelled) and watch.reason == "superseded":
        raise AttemptSuperseded(f"job {record.job_id}: attempt {watch.keeper.attempt} lost its "
                                "lease") from exc
    if isinstance(exc, Cancelled) and watch.reason == "shutdown":
        record.status, record.started_at, record.worker = "queued", None, None
        record.progress = Progress()
        ctx.store.save(record)
        watch.keeper.release()
        raise JobInterrupted(f"job {record.job_id} interrupted by a worker shutdown") from exc
    if isinstance(exc, Cancelled) and watch.reason != "time_limit":
        return "cancelled", JobError(code="cancelled", message=str(exc))
    if isinstance(exc, SoftTimeLimitExceeded | Cancelled):
        message = f"the job ran past CGIDM_TASK_SOFT_TIME_LIMIT ({limit} s); use fewer images " \
                  "or steps, or ask the operator for a longer limit"
        return "failed", JobError(code="time_limit", message=message)
    if isinstance(exc, UnknownModel | InvalidModelReference):
        return "failed", JobError(code="unknown_model", message=str(exc))
    if isinstance(exc, CGIDMError | ModelFetchError | ModelFileError):
        return "failed", JobError(code=exc.code, message=str(exc))
    from cgidm.result_signing import SigningKeyError

    if isinstance(exc, SigningKeyError):
        log.error("job %s: %s", record.job_id, exc)
        return "failed", JobError(code="signing_key", message=f"the service cannot sign "
                                  f"results: {exc}")
    log.exception("job %s failed unexpectedly", record.job_id)
    return "failed", JobError(code="internal_error", message=f"{type(exc).__name__}: {exc}")


def _check_job_images(ctx: WorkerContext, record: JobRecord, watch: Watch,
                      attempt: str) -> JobResult:
    """Run the method on the job's images and return its result: load the pair, choose the
    prompt and settings, invert, store the pictures, build the evidence document."""
    from cgidm_core.prompts import check_prompt_length

    started = time.monotonic()
    pre, ft, pair = _load_pair(ctx, record, watch)
    choice = _prompt_choice(record.settings, pair, ft)
    check_prompt_length(pair, choice.text)
    config = _inversion_config(record.settings)
    images = [ctx.store.read_input(item.key) for item in record.inputs]
    results, batch_size, halvings = _run_method(ctx, record, watch, pair, images, choice, config)
    records = _store_pictures(ctx, record, results, attempt)
    return _job_result(ctx, record, records, results, pair, pre, ft, choice, config,
                       elapsed=time.monotonic() - started,
                       batch_size_used=halvings[-1] if halvings else min(batch_size,
                                                                         len(images)),
                       oom_halvings=len(halvings))


def _load_pair(ctx: WorkerContext, record: JobRecord, watch: Watch) -> tuple[Any, Any, Any]:
    """The job's (pretrained entry, fine-tuned entry, loaded pair), from the worker's cache;
    records whether the cache held it and how long loading took."""
    settings = record.settings
    if looks_like_reference(settings.finetuned):  # a hub reference: fetched here, not before
        from worker.remote_models import AUTO_BASE, fetch_remote

        base = None
        ft: ModelEntry | UploadedModel | RemoteModel
        if settings.pretrained != AUTO_BASE:
            base = ctx.registry().get(settings.pretrained)
            if base.finetuned_from is not None:
                raise UnknownModel(f"{base.id!r} is a fine-tune; name the base model as "
                                   "pretrained")
        pre, ft = fetch_remote(ctx, settings.finetuned, base, record.owner)
    else:
        pre, ft = ctx.resolver(record.owner).check_pair(settings.pretrained, settings.finetuned)
    load_start = time.monotonic()
    pair, hit = ctx.cache.get(ctx.pair_key(pre, ft))
    record.worker = {
        **(record.worker or {}),
        "worker_id": ctx.worker_id,
        "model_cache": "hit" if hit else "miss",
        "load_seconds": round(time.monotonic() - load_start, 3),
    }
    if not watch.keeper.lost.is_set():  # a superseded attempt writes nothing
        ctx.store.save(record)
    ctx.publish_stats()
    return pre, ft, pair


def _prompt_choice(settings: Any, pair: Any, ft: Any) -> Any:
    """The prompt both models are conditioned on and its source; an uploaded model's prompt
    says it came from the upload rather than the registry."""
    from cgidm_core.prompts import choose_prompt

    choice = choose_prompt(settings.prompt, pair, registry_prompt=ft.prompt)
    upload_source = getattr(ft, "prompt_source", None)
    if choice.source == "registry" and upload_source:
        choice = dataclasses.replace(choice, source=upload_source)
    return choice


def _inversion_config(settings: Any) -> Any:
    from cgidm_core.inversion_config import preset_config

    overrides = settings.inversion_overrides()
    overrides.setdefault("base_recovery", True)  # the report shows it beside the recovery
    return preset_config(settings.preset, overrides)


def _run_method(ctx: WorkerContext, record: JobRecord, watch: Watch, pair: Any,
                images: list[Any], choice: Any, config: Any) -> tuple[Any, int, list[int]]:
    """``authenticate`` with the job's hooks; returns its results, the batch size it started
    with and every batch size it was halved to after the device ran out of memory."""
    from cgidm_core import authenticate
    from cgidm_core.api import checked_batch_size

    settings = record.settings
    feature_model = ctx.settings.feature_model if settings.metric in FEATURE_METRICS else None
    batch_size = checked_batch_size(pair, images, settings.batch_size)
    halvings: list[int] = []

    def halved(size: int) -> None:
        halvings.append(size)
        log.warning("job %s: the device ran out of memory; batch size halved to %d",
                    record.job_id, size)

    results = authenticate(
        pair,
        images,
        names=[item.name for item in record.inputs],
        prompt=choice.text,
        config=config,
        score_metric=settings.metric,
        feature_model=feature_model,
        batch_size=settings.batch_size,
        progress=watch.progress,
        should_cancel=watch.should_cancel,
        prompt_source=choice.source,
        on_batch_halved=halved,
    )
    return results, batch_size, halvings


def _store_pictures(ctx: WorkerContext, record: JobRecord, results: Any,
                    attempt: str) -> list[dict[str, Any]]:
    """Write every image's pictures under this run's prefix; returns the per-image records
    (the library's values, the image's role and its artifact links)."""
    roles = {item.name: item.role for item in record.inputs}
    credentials = {item.name: item.content_credentials for item in record.inputs}
    uploads = {item.name: item.sha256 for item in record.inputs}
    key = _signing_key(str(ctx.settings.resolved_signing_key))
    records: list[dict[str, Any]] = []
    for res in results:
        hashes: dict[str, str] = {}
        labelled = True
        pictures = dict(zip(ARTIFACT_KINDS, (res.recovered, res.partial, res.side_by_side()),
                            strict=True))
        if res.base_recovered is not None:
            pictures[BASE_RECOVERED] = res.base_recovered
        for kind, picture in pictures.items():
            data, signed = _with_credentials(_png(picture), key, record.job_id, res.name, kind,
                                             uploads.get(res.name))
            labelled = labelled and signed
            hashes[kind] = hashlib.sha256(data).hexdigest()
            ctx.store.storage.put_bytes(artifact_key(record.job_id, res.name, kind, attempt),
                                        data, content_type="image/png")
        # the signature covers the pictures through these hashes (cgidm.result_signing)
        records.append({**res.to_dict(), "role": roles[res.name],
                        "artifacts": artifact_links(record.job_id, res.name,
                                                    res.base_recovered is not None),
                        "picture_sha256": hashes,
                        # the pictures carry their own C2PA manifest (cgidm.picture_credentials)
                        "picture_credentials": "c2pa" if labelled else None,
                        # the upload's own C2PA credentials, as the gateway read them: signed
                        # into the result with everything else
                        **({"content_credentials": credentials[res.name]}
                           if credentials.get(res.name) else {})})
    return records


def _with_credentials(png: bytes, key: Any, job_id: str, name: str, kind: str,
                      derived_from: str | None) -> tuple[bytes, bool]:
    """The picture with its C2PA manifest; the picture alone (and a warning in the log) when
    the manifest cannot be made: the signed result covers the picture's hash either way."""
    from cgidm.picture_credentials import sign_picture

    try:
        return sign_picture(png, key, job_id=job_id, kind=kind, name=name,
                            derived_from_sha256=derived_from), True
    except Exception as exc:  # noqa: BLE001 - c2pa raises many kinds; the job goes on
        log.warning("job %s: %s %s stored without C2PA credentials: %s", job_id, name, kind, exc)
        return png, False


def _job_result(ctx: WorkerContext, record: JobRecord, records: list[dict[str, Any]],
                results: Any, pair: Any, pre: Any, ft: Any, choice: Any, config: Any, *,
                elapsed: float, batch_size_used: int, oom_halvings: int) -> JobResult:
    """The service's result: the evidence document (cgidm_core.evidence) in the API's shape."""
    from cgidm_core.evidence import build_evidence

    evidence = build_evidence([r for r in records if r["role"] == "image"],
                              [r for r in records if r["role"] == "control"],
                              alpha=ctx.settings.controls_alpha)
    set_test = None
    if evidence["set_test"] is not None:
        set_test = SetTest(**{k: v for k, v in evidence["set_test"].items()
                              if k not in ("p_values", "verdicts")})
    result = JobResult(
        pretrained=pre.id,
        finetuned=ft.id,
        metric=record.settings.metric or DEFAULT_METRIC,
        images=[ImageScore(**r) for r in evidence["images"]],
        controls=[ImageScore(**r) for r in evidence["controls"]],
        controls_test=set_test,
        evidence=evidence["evidence"],
        config=config.to_dict(),
        pair=pair.describe(),
        elapsed_seconds=round(elapsed, 3),
        provenance=_with_civitai_lookup(ctx, service_provenance(results.provenance, record,
                                                                pre, ft), ft),
        batch_size_used=batch_size_used,
        oom_halvings=oom_halvings,
        **choice.to_settings(),
    )
    return sign_result(ctx, result)


@functools.lru_cache(maxsize=4)
def _signing_key(path: str) -> Any:
    from cgidm.result_signing import load_or_create_key

    return load_or_create_key(Path(path))


def sign_result(ctx: WorkerContext, result: JobResult) -> JobResult:
    """The result with the service's signature block (CGIDM_SIGNING_KEY). A key that cannot be
    read or made fails the job with that message: an unsigned result would look like a forgery
    to everyone who checks it."""
    from cgidm.result_signing import sign_document

    key = _signing_key(str(ctx.settings.resolved_signing_key))
    signed = sign_document(result.model_dump(mode="json"), key, signer="cgidm service")
    result.signature = signed["signature"]
    return result


def _with_civitai_lookup(ctx: WorkerContext, provenance: dict[str, Any],
                         ft: Any) -> dict[str, Any]:
    from worker.remote_models import civitai_lookup

    found = civitai_lookup(ctx, ft)
    if found is not None:
        provenance["models"]["finetuned"]["civitai"] = found
    return provenance


def service_provenance(library: dict[str, Any], record: JobRecord, pre: Any,
                       ft: Any) -> dict[str, Any]:
    """The library's provenance, as a service result shows it: each input's hash as the client
    uploaded it (the gateway's), model ids instead of the operator's paths."""
    document = dict(library)
    document["inputs"] = [
        {"name": item.name, "role": item.role, "filename": item.filename,
         "sha256": item.sha256 or computed["sha256"],
         "of": "upload" if item.sha256 else "stored_png", "stored_sha256": computed["sha256"]}
        for item, computed in zip(record.inputs, library["inputs"], strict=True)]
    models: dict[str, Any] = {}
    for role, entry in (("pretrained", pre), ("finetuned", ft)):
        loaded = (library.get("models") or {}).get(role) or {}
        models[role] = {"id": entry.id, "files": loaded.get("files", [])}
        hub = getattr(entry, "hub", None)
        if hub:  # fetched from a hub: where from, which revision or version, when
            models[role].update(sha256=entry.sha256, kind=entry.kind, hub=hub)
        elif getattr(entry, "sha256", None):  # an upload: the file the client sent
            models[role].update(uploaded=True, sha256=entry.sha256, kind=entry.kind)
    document["models"] = models
    document["job_id"] = record.job_id  # binds the signed result to its job
    return document

