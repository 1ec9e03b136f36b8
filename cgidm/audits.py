"""Audit records: what the gateway and the workers exchange through storage for one audit.

An audit is one portfolio against many models (cgidm_core.audit). Everything lives under
``audits/<audit_id>/``, one writer per object, so no object is ever updated by two processes::

    request.json              the gateway, once: models, settings, inputs, owner
    images/000_<name>.png     the portfolio;   controls/000_<name>.png  the known non-members
    models/0003.json          a worker, when model 3 is done (its plain entry: screen, tier,
                              p-value, per-image scores); never rewritten
    progress/0003.json        a worker, while model 3 runs (PGD steps done / total)
    pictures/0003/<name>/side_by_side.png | recovered.png   a worker, for full-verdict models
    result.json               the worker that stored the last model: the ranked, decided audit
    error.json                a worker, when the audit cannot go on (a model failed to load)
    cancel                    the gateway, when the client cancels

Why per-model objects: a worker lost mid-audit costs only the model it was running. Its group's
lease lapses, a reaper hands the group out again (cgidm/audit_leases.py) and the new attempt
skips every model whose ``models/NNNN.json`` exists. The status a client sees is derived from
which objects exist.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from cgidm.errors import CgidmServiceError
from cgidm.storage import ObjectNotFound, Storage, StorageError

#: The former orchestrating task (argument: the audit id), kept for messages queued before the
#: gateway sent the groups itself (cgidm.audit_leases.send_audit).
AUDIT_TASK = "cgidm.audit"
#: One group of an audit's models on one base (arguments: audit id, model indices).
AUDIT_GROUP_TASK = "cgidm.audit_group"

AuditStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
_AUDIT_ID = re.compile(r"^[0-9a-f]{32}$")


class AuditNotFound(CgidmServiceError, LookupError):
    """No audit with this id (or another key's audit)."""

    code, http_status = "not_found", 404


def new_audit_id() -> str:
    return uuid.uuid4().hex


def is_audit_id(value: str) -> bool:
    return bool(_AUDIT_ID.match(value))


def audit_prefix(audit_id: str) -> str:
    return f"audits/{audit_id}/"


class AuditInput(BaseModel):
    name: str
    key: str
    sha256: str


class AuditModelSpec(BaseModel):
    pretrained: str
    finetuned: str
    prompt: str | None = None


class AuditRequest(BaseModel):
    """What the gateway accepted: written once, read by every subtask."""

    audit_id: str
    owner: str | None = None
    created_at: datetime
    models: list[AuditModelSpec]
    level: float = Field(0.05, gt=0, lt=1)
    correction: Literal["bh", "holm", "bonferroni"] = "bh"
    clear_p: float = Field(0.2, ge=0, le=1)
    steps: int | None = Field(None, ge=1, le=10_000)
    seed: int = 0
    images: list[AuditInput]
    controls: list[AuditInput]


#: Most models in one subtask: a subtask must end within the task time limit that a job has
#: (CGIDM_TASK_TIME_LIMIT), and a lost one should cost little; many models on one base are
#: split into several subtasks, all routed by that base.
GROUP_SIZE = 8


def model_groups(models: list[AuditModelSpec], size: int = GROUP_SIZE
                 ) -> list[tuple[str, list[int]]]:
    """(base, model indices) of each subtask: models grouped by base, routed by it, so its
    worker keeps the base loaded and shares the base's passes across the group's models; at
    most ``size`` models per subtask."""
    by_base: dict[str, list[int]] = {}
    for i, model in enumerate(models):
        by_base.setdefault(model.pretrained, []).append(i)
    return [(base, indices[start:start + size]) for base, indices in by_base.items()
            for start in range(0, len(indices), size)]


class AuditStore:
    """Reads and writes the objects of audits (see the module docstring)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    # keys
    @staticmethod
    def input_key(audit_id: str, role: str, index: int, name: str) -> str:
        folder = "images" if role == "image" else "controls"
        return f"{audit_prefix(audit_id)}{folder}/{index:03d}_{name}.png"

    @staticmethod
    def model_key(audit_id: str, index: int) -> str:
        return f"{audit_prefix(audit_id)}models/{index:04d}.json"

    @staticmethod
    def progress_key(audit_id: str, index: int) -> str:
        return f"{audit_prefix(audit_id)}progress/{index:04d}.json"

    @staticmethod
    def picture_key(audit_id: str, index: int, name: str, kind: str) -> str:
        return f"{audit_prefix(audit_id)}pictures/{index:04d}/{name}/{kind}.png"

    # the gateway
    def create(self, request: AuditRequest, files: list[tuple[str, bytes]]) -> None:
        """Inputs first, then ``request.json``: an audit that exists has its inputs. A failure
        half-way removes what was written."""
        try:
            for key, data in files:
                self.storage.put_bytes(key, data, content_type="image/png")
            self.storage.put_json(f"{audit_prefix(request.audit_id)}request.json",
                                  request.model_dump(mode="json"))
        except StorageError:
            self.delete_quietly(request.audit_id)
            raise

    def delete_quietly(self, audit_id: str) -> None:
        with contextlib.suppress(StorageError):
            self.storage.delete_prefix(audit_prefix(audit_id))

    def request_cancel(self, audit_id: str) -> None:
        self.storage.put_bytes(f"{audit_prefix(audit_id)}cancel", b"1")

    # everyone
    def load_request(self, audit_id: str) -> AuditRequest:
        if not is_audit_id(audit_id):
            raise AuditNotFound(audit_id)
        try:
            return AuditRequest.model_validate(
                self.storage.get_json(f"{audit_prefix(audit_id)}request.json"))
        except ObjectNotFound:
            raise AuditNotFound(audit_id) from None

    def cancelled(self, audit_id: str) -> bool:
        return self.storage.exists(f"{audit_prefix(audit_id)}cancel")

    def done_models(self, audit_id: str) -> dict[int, dict[str, Any]]:
        """Index -> stored entry of every model already done."""
        out: dict[int, dict[str, Any]] = {}
        for key in self.storage.list(f"{audit_prefix(audit_id)}models/"):
            stem = key.rsplit("/", 1)[-1].removesuffix(".json")
            if stem.isdigit():
                with contextlib.suppress(ObjectNotFound):
                    out[int(stem)] = self.storage.get_json(key)
        return out

    def progress(self, audit_id: str) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for key in self.storage.list(f"{audit_prefix(audit_id)}progress/"):
            stem = key.rsplit("/", 1)[-1].removesuffix(".json")
            if stem.isdigit():
                with contextlib.suppress(ObjectNotFound):
                    out[int(stem)] = self.storage.get_json(key)
        return out

    def result(self, audit_id: str) -> dict[str, Any] | None:
        try:
            return self.storage.get_json(f"{audit_prefix(audit_id)}result.json")
        except ObjectNotFound:
            return None

    def error(self, audit_id: str) -> dict[str, Any] | None:
        try:
            return self.storage.get_json(f"{audit_prefix(audit_id)}error.json")
        except ObjectNotFound:
            return None

    # the workers
    def save_model(self, audit_id: str, index: int, entry: dict[str, Any]) -> None:
        self.storage.put_json(self.model_key(audit_id, index), entry)

    def save_progress(self, audit_id: str, index: int, done: int, total: int,
                      stopped: str | None = None) -> None:
        """``stopped``: why a model stopped for good before it was done (``cancelled``)."""
        record: dict[str, Any] = {"steps_done": done, "steps_total": total,
                                  "at": datetime.now(timezone.utc).isoformat()}
        if stopped:
            record["stopped"] = stopped
        self.storage.put_json(self.progress_key(audit_id, index), record)

    def save_result(self, audit_id: str, document: dict[str, Any]) -> None:
        self.storage.put_json(f"{audit_prefix(audit_id)}result.json", document)

    def save_error(self, audit_id: str, code: str, message: str) -> None:
        self.storage.put_json(f"{audit_prefix(audit_id)}error.json",
                              {"code": code, "message": message})

    def status(self, request: AuditRequest) -> dict[str, Any]:
        """What GET /audits/{id} returns: status, per-model progress, the result when done."""
        audit_id = request.audit_id
        result = self.result(audit_id)
        error = self.error(audit_id)
        done = self.done_models(audit_id)
        running = self.progress(audit_id)
        if result is not None:
            status: AuditStatus = "succeeded"
        elif error is not None:
            status = "failed"
        elif self.cancelled(audit_id):
            status = "cancelled"
        else:
            status = "running" if (done or running) else "queued"
        models = []
        for i, spec in enumerate(request.models):
            row: dict[str, Any] = {"index": i, "finetuned": spec.finetuned,
                                   "pretrained": spec.pretrained}
            if i in done:
                entry = done[i]
                row.update(state="done", tier=entry.get("tier"),
                           screen_p_value=entry.get("screen_p_value"),
                           p_value=entry.get("p_value"))
            elif status == "cancelled":  # stopped where it was, or never started
                row.update(running.get(i, {}), state="cancelled")
            elif i in running:
                row.update(state="running", **running[i])
            else:
                row["state"] = "queued"
            models.append(row)
        return {
            "audit_id": audit_id,
            "status": status,
            "created_at": request.created_at.isoformat(),
            "progress": {"models_total": len(request.models), "models_done": len(done),
                         "fraction": len(done) / len(request.models), "models": models},
            "error": error,
            "result": result,
        }
