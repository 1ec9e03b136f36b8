"""The audit tasks: one subtask per group of models on one base.

The gateway sends one ``cgidm.audit_group`` per group (cgidm.audit_leases.send_audit), routed
like a job of that base (cgidm.queue_routing), so the worker that has the base loaded gets its
models; no orchestrating task runs (``cgidm.audit``, which did, stays only for messages queued
before the gateway sent the groups itself: it held no lease, so a worker lost while it ran left
the audit queued until the broker's visibility timeout).
Each subtask audits its models one by one (cgidm_core.audit_run: screen, full verdict where the
screen cannot clear), stores each model's entry and pictures as soon as it is done, and the
subtask that stores the last model assembles the ranked, decided result, under its lease (a
worker lost while assembling is handed out again like one lost mid-model: the next attempt has
nothing left to run and assembles). Each group subtask holds
a lease, as a job does (cgidm/audit_leases.py, cgidm/leases.py): a subtask whose worker is lost
is handed out again by a reaper once its lease lapses (about a minute at the defaults) and skips
the models already stored (cgidm/audits.py), so a lost worker costs only the model it was
running. Celery's late acknowledgement stays as the backstop.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from typing import TYPE_CHECKING, Any

from cgidm.audits import (
    AUDIT_GROUP_TASK,
    AUDIT_TASK,
    AuditNotFound,
    AuditRequest,
    AuditStore,
)
from cgidm.model_refs import looks_like_reference
from cgidm.settings import get_settings
from cgidm.storage import StorageError, StorageUnavailable
from worker.celery_app import celery_app
from worker.context import WorkerContext, get_context
from worker.leasing import LeaseKeeper

if TYPE_CHECKING:  # annotations only: remote_models is imported where a reference is fetched
    from cgidm.registry import ModelEntry
    from cgidm.uploaded_models import UploadedModel
    from worker.remote_models import RemoteModel

log = logging.getLogger("cgidm.worker.audit")

_SETTINGS = get_settings()
#: Seconds between progress writes and between looks for the cancel marker.
PROGRESS_INTERVAL = 1.0
CANCEL_INTERVAL = 2.0


def picture_url(audit_id: str, index: int, name: str, kind: str) -> str:
    return f"/audits/{audit_id}/pictures/{index}/{name}/{kind}.png"


def _store(ctx: WorkerContext) -> AuditStore:
    return AuditStore(ctx.store.storage)


@celery_app.task(name=AUDIT_TASK)
def start_audit(audit_id: str) -> str:
    """The orchestrating task of gateways before the gateway sent the groups itself: kept so a
    message queued before an upgrade still runs. Sends the groups with a model not yet stored
    (harmless where they were sent already: the lease refuses a stale attempt), or assembles at
    once when every model is done."""
    from cgidm.audit_leases import send_audit

    ctx = get_context()
    store = _store(ctx)
    try:
        request = store.load_request(audit_id)
    except AuditNotFound:
        return "missing"
    if store.result(audit_id) is not None or store.cancelled(audit_id):
        return "finished"
    sent = send_audit(celery_app, ctx.settings, request.models, audit_id,
                      store.done_models(audit_id))
    if not sent:
        assemble(store, request)
    return f"sent {sent} group(s)"


@celery_app.task(name=AUDIT_GROUP_TASK, autoretry_for=(StorageUnavailable,),
                 retry_backoff=_SETTINGS.storage_retry_backoff,
                 retry_backoff_max=_SETTINGS.storage_retry_backoff_max, retry_jitter=True,
                 max_retries=_SETTINGS.storage_retries)
def audit_group(audit_id: str, indices: list[int], attempt: int = 1,
                group: int | None = None) -> str:
    """Run one attempt of one group under its lease (cgidm/audit_leases.py): a lost worker's
    group is handed out again by a reaper within about a lease's length, not after the broker's
    visibility timeout. A storage outage retries the subtask (the models stored are skipped);
    any other failure ends the audit ``failed`` with its message rather than leaving it
    running. A message without a group number (sent before leases) runs without one."""
    from cgidm.audit_leases import group_lease_id
    from cgidm_core.errors import Cancelled

    ctx = get_context()
    store = _store(ctx)
    try:
        request = store.load_request(audit_id)
    except AuditNotFound:
        return "missing"
    lease_id = group_lease_id(audit_id, group if group is not None else -1)
    keeper = LeaseKeeper(ctx.leases if group is not None else None, ctx.settings, lease_id,
                         attempt, ctx.worker_id)
    if store.result(audit_id) is not None or store.cancelled(audit_id):
        keeper.done()
        return "finished"
    base = request.models[indices[0]].pretrained if indices else ""
    claim = keeper.claim((base, base))
    if not claim.ok:
        log.warning("audit %s group %s: delivery of attempt %d dropped: %s (current attempt "
                    "%d)", audit_id, group, attempt, claim.verdict, claim.current)
        return "stale"
    keeper.start()
    try:
        run_group(ctx, store, request, indices, keeper)
        if not keeper.commit():  # superseded: the current attempt assembles
            return "stale"
        # Under the heartbeat and the handlers below: an assembly that outlasts the lease (the
        # entries of a large audit read back from storage) is not handed out again, a storage
        # outage while assembling retries it under a held lease, and any other error ends the
        # audit failed with its message (not, after CGIDM_MAX_ATTEMPTS lease lapses, as
        # "worker_lost"). A worker lost here leaves the lease committing: it lapses, and the
        # reaper's next attempt has no model left to run and assembles (audit_leases.py).
        assemble(store, request)
    except Cancelled:
        if keeper.lost.is_set():
            log.warning("audit %s group %s: attempt %d was handed out again; stopped", audit_id,
                        group, attempt)
            return "stale"
        log.info("audit %s cancelled", audit_id)
        _mark_stopped(store, request, indices)
        keeper.done()
        return "cancelled"
    except StorageError:
        # retried from the start by the task (same attempt); the lease is held meanwhile
        keeper.hold(ctx.settings.storage_retry_backoff_max + ctx.settings.lease_ttl)
        raise
    except Exception as exc:
        if keeper.lost.is_set():  # superseded: the current attempt decides
            return "stale"
        log.exception("audit %s failed", audit_id)
        store.save_error(audit_id, getattr(exc, "code", None) or type(exc).__name__, str(exc))
        keeper.done()
        return "failed"
    finally:
        keeper.stop()
    keeper.done()
    return "done"


def _mark_stopped(store: AuditStore, request: AuditRequest, indices: list[int]) -> None:
    """After a cancel: the group's model that was running keeps its progress object, marked
    stopped, so storage says how far it got and that nothing runs any more."""
    done = store.done_models(request.audit_id)
    for index, progress in store.progress(request.audit_id).items():
        if index in indices and index not in done:
            store.save_progress(request.audit_id, index, progress.get("steps_done", 0),
                                progress.get("steps_total", 0), stopped="cancelled")


class _GroupCallbacks:
    """What :func:`cgidm_core.audit_run.run_audit` calls back into while it audits one group:
    the worker's model loading (registry, uploads, hub references, the pair cache), storing each
    finished model with its pictures as soon as it is done (what makes a redelivered subtask
    skip it), progress writes and cancel looks, both throttled so storage is not hammered."""

    def __init__(self, ctx: WorkerContext, store: AuditStore, request: AuditRequest,
                 todo: list[int], keeper: LeaseKeeper):
        from cgidm_core.audit import AuditModel

        self.ctx, self.store, self.request, self.keeper = ctx, store, request, keeper
        self.attempt = keeper.attempt
        self.resolver = ctx.resolver(request.owner)
        self.models = [self._spec(i) if i in todo
                       else AuditModel(m.pretrained, m.finetuned, m.prompt)
                       for i, m in enumerate(request.models)]
        self.entries: dict[int, Any] = {}
        self._last = {"progress": 0.0, "cancel": 0.0}
        self._cancelled = False

    def _spec(self, i: int) -> Any:
        """Model ``i`` as the audit runs it; without a prompt, the registry's instance prompt
        of the fine-tune, if it has one."""
        from cgidm_core.audit import AuditModel

        model = self.request.models[i]
        prompt = model.prompt
        if prompt is None:
            try:
                prompt = getattr(self.resolver.get(model.finetuned), "prompt", None)
            except Exception:  # noqa: BLE001 - an unknown model fails at loading, with its message
                prompt = None
        return AuditModel(model.pretrained, model.finetuned, prompt)

    def load(self, model: Any) -> Any:
        ctx = self.ctx
        if looks_like_reference(model.finetuned):  # fetched here, as for a job
            from worker.remote_models import AUTO_BASE, fetch_remote

            base = None if model.pretrained == AUTO_BASE else ctx.registry().get(model.pretrained)
            ft: ModelEntry | UploadedModel | RemoteModel
            pre, ft = fetch_remote(ctx, model.finetuned, base, self.request.owner)
        else:
            pre, ft = self.resolver.check_pair(model.pretrained, model.finetuned)
        pair, _hit = ctx.cache.get(ctx.pair_key(pre, ft))
        return pair

    def on_model(self, outcome: Any) -> None:
        from cgidm_core.errors import Cancelled

        if self.keeper.lost.is_set():  # handed out again: the current attempt stores it
            raise Cancelled("this attempt of the audit group was handed out again")
        audit_id = self.request.audit_id
        entry = dict(outcome.entry)
        index = entry["index"]
        if outcome.results:
            stored = {result.name: self._store_pictures(index, result)
                      for result in outcome.results}
            entry["pictures"] = {name: urls for name, (urls, _) in stored.items()}
            # the pictures are evidence too: the signed result covers their hashes
            entry["picture_sha256"] = {name: digests for name, (_, digests) in stored.items()}
        entry["worker_id"] = self.ctx.worker_id
        entry["attempt"] = self.attempt  # which delivery of the group computed it
        entry["finished_at"] = time.time()
        self.store.save_model(audit_id, index, entry)
        self.entries[index] = entry

    def _store_pictures(self, index: int, result: Any) -> tuple[dict[str, str], dict[str, str]]:
        """(kind -> URL, kind -> sha256) of one image's stored pictures."""
        audit_id = self.request.audit_id
        digests = {}
        for kind, picture in (("side_by_side", result.side_by_side()),
                              ("recovered", result.recovered)):
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            self.store.storage.put_bytes(self.store.picture_key(audit_id, index, result.name, kind),
                                         buffer.getvalue(), content_type="image/png")
            digests[kind] = hashlib.sha256(buffer.getvalue()).hexdigest()
        return ({kind: picture_url(audit_id, index, result.name, kind)
                 for kind in ("side_by_side", "recovered")}, digests)

    def on_error(self, index: int, exc: Exception) -> dict[str, Any]:
        """A model that cannot be loaded or run is stored as failed, with its message (not
        ranked, not flagged, outside the correction: cgidm_core.audit.decide_models); the
        group goes on with its other models."""
        from cgidm_core.audit import failed_entry
        from cgidm_core.errors import Cancelled

        if self.keeper.lost.is_set():  # handed out again: the current attempt records it
            raise Cancelled("this attempt of the audit group was handed out again")
        entry = {**failed_entry(index, self.models[index], exc),
                 "worker_id": self.ctx.worker_id, "attempt": self.attempt,
                 "finished_at": time.time()}
        log.warning("audit %s: model %d failed: %s", self.request.audit_id, index, exc)
        self.store.save_model(self.request.audit_id, index, entry)
        return entry

    def progress(self, index: int, step: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last["progress"] >= PROGRESS_INTERVAL or step == total:
            self._last["progress"] = now
            self.store.save_progress(self.request.audit_id, index, step, total)

    def should_cancel(self) -> bool:
        if self.keeper.lost.is_set():  # this attempt's lease lapsed and it was handed out again
            return True
        now = time.monotonic()
        if now - self._last["cancel"] >= CANCEL_INTERVAL:
            self._last["cancel"] = now
            self._cancelled = self.store.cancelled(self.request.audit_id)
        return self._cancelled


def run_group(ctx: WorkerContext, store: AuditStore, request: AuditRequest,
              indices: list[int], keeper: LeaseKeeper) -> None:
    """Audit the models at ``indices`` that are not stored yet, storing each as it finishes."""
    from cgidm_core.audit_run import AuditSettings, run_audit
    from cgidm_core.images import load_image
    from cgidm_core.inversion import InversionConfig

    # 1. Only the models no earlier delivery of this subtask stored.
    done = store.done_models(request.audit_id)
    todo = [i for i in indices if i not in done]
    if not todo:
        return
    # 2. The portfolio and the controls, read once for the whole group.
    images = [load_image(ctx.store.read_input(item.key), name=item.name)
              for item in request.images]
    controls = [load_image(ctx.store.read_input(item.key), name=item.name)
                for item in request.controls]
    # 3. Screen and (where the screen cannot clear) invert each model, storing it as it ends.
    calls = _GroupCallbacks(ctx, store, request, todo, keeper)
    # only "steps" (an int) can be in the mapping, which mypy cannot see through **
    config = InversionConfig(seed=request.seed, **({"steps": request.steps}  # type: ignore[arg-type]
                                                   if request.steps else {}))
    settings = AuditSettings(level=request.level, correction=request.correction,
                             clear_p=request.clear_p, inversion=config)
    from worker.audit_swap import base_passes_for, swapping_loader

    load = swapping_loader(ctx, calls.resolver, calls.load)  # LoRAs swapped on a loaded base
    run_audit(calls.models, images, controls, [i.name for i in request.images],
              [i.name for i in request.controls], load, settings, indices=todo,
              on_model=calls.on_model, progress=calls.progress,
              should_cancel=calls.should_cancel, on_error=calls.on_error,
              base_passes=base_passes_for(request.audit_id, calls.resolver))
    stats = load.stats
    log.info("audit %s: %d LoRA(s) swapped on a loaded base (%d base load(s)), %d model(s) "
             "loaded as pairs", request.audit_id, stats.swaps, stats.base_loads,
             stats.fallback_loads)


def sign_audit(document: dict[str, Any]) -> dict[str, Any]:
    """The assembled audit with the service's signature block: the key and signer of a job's
    result (CGIDM_SIGNING_KEY; worker/job_runner.py), so one published key set verifies both."""
    from cgidm.audit_signing import SIGNER_SERVICE
    from cgidm.result_signing import sign_document
    from worker.job_runner import _signing_key

    key = _signing_key(str(get_context().settings.resolved_signing_key))
    return sign_document(document, key, signer=SIGNER_SERVICE)


def assemble(store: AuditStore, request: AuditRequest) -> bool:
    """Write ``result.json`` when every model is stored (any subtask may: the document depends
    only on the stored entries, so two subtasks finishing together write the same bytes)."""
    from cgidm.result_signing import SigningKeyError
    from cgidm_core.audit import decide_models, decision_settings
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.provenance import software

    audit_id = request.audit_id
    done = store.done_models(audit_id)
    if len(done) < len(request.models) or store.result(audit_id) is not None:
        return False
    ranked = decide_models([done[i] for i in range(len(request.models))],
                           level=request.level, correction=request.correction)
    for model in ranked:
        if not model["flagged"]:
            model.pop("pictures", None)  # evidence pictures are shown for flagged models
            model.pop("picture_sha256", None)
    document: dict[str, Any] = {
        "models": ranked,
        "decision": decision_settings(request.level, request.correction, request.clear_p),
        "counts": {"models": len(ranked),
                   "full_verdicts": sum(m.get("tier") == "full" for m in ranked),
                   "cleared_by_screen": sum(bool(m.get("cleared_by_screen")) for m in ranked),
                   "errors": sum(m.get("tier") == "error" for m in ranked),
                   "flagged": sum(m["flagged"] for m in ranked)},
        "images": [i.name for i in request.images],
        "controls": [i.name for i in request.controls],
        # only "steps" (an int) can be in the mapping, which mypy cannot see through **
        "settings": {"inversion": InversionConfig(seed=request.seed, **(
            {"steps": request.steps} if request.steps else {})).to_dict()},  # type: ignore[arg-type]
        "audit_id": audit_id,  # binds the signed result to its audit
        "software": software(),
    }
    try:
        document = sign_audit(document)
    except SigningKeyError as exc:
        log.error("audit %s: %s", audit_id, exc)
        store.save_error(audit_id, "signing_key", f"the service cannot sign results: {exc}")
        return False
    store.save_result(audit_id, document)
    log.info("audit %s assembled: %d models, %d flagged", audit_id, len(ranked),
             document["counts"]["flagged"])
    return True
