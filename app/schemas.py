"""Response documents of the HTTP API (the job documents themselves live in cgidm.jobs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cgidm.jobs import ARTIFACT_KINDS, JobRecord, JobStatus
from cgidm.registry import PublicModel

_JOB = "3f0c6a9e2b7d4c1e8a5f9b0d2c4e6a81"
_ARTS = {k: f"/jobs/{_JOB}/artifacts/olive-picking-1889/{k}.png"
         for k in ARTIFACT_KINDS}

JOB_EXAMPLE: dict[str, Any] = {
    "job_id": _JOB,
    "status": "succeeded",
    "status_url": f"/jobs/{_JOB}",
    "cancel_requested": False,
    "progress": {"fraction": 1.0, "steps_done": 100, "steps_total": 100, "eta_seconds": 0.0},
    "created_at": "2024-06-01T12:00:00Z",
    "started_at": "2024-06-01T12:00:01Z",
    "finished_at": "2024-06-01T12:00:40Z",
    "settings": {"pretrained": "demo-base", "finetuned": "demo-vangogh", "steps": 100},
    "owner": None,
    "error": None,
    "result": {
        "pretrained": "demo-base",
        "finetuned": "demo-vangogh",
        "metric": "ssim",
        "images": [{"name": "olive-picking-1889", "role": "image", "score": 0.61,
                    "metrics": {"ssim": 0.61, "psnr": 19.2, "mse": 0.012},
                    "p_value": 0.0909, "verdict": "member_evidence", "artifacts": _ARTS}],
        "controls": [],
        "controls_test": {"u_statistic": 87.0, "p_value": 0.002, "auc": 0.87, "alpha": 0.05,
                          "n_suspect": 10, "n_controls": 10},
    },
}


class JobAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"job_id": _JOB, "status": "queued", "status_url": f"/jobs/{_JOB}"}]})

    job_id: str
    status: Literal["queued"] = "queued"
    status_url: str = Field(description="Poll this (GET) for progress and the result.")
    warnings: list[str] = Field(
        default_factory=list,
        description="What was accepted with a change, e.g. an animated image of which only the "
        "first frame is used.")


class JobView(JobRecord):
    """A job as clients see it. A queued job with a cancel request already shows as cancelled;
    the worker finalises it when it reaches the job."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    status: JobStatus
    status_url: str
    cancel_requested: bool = False


class ModelView(PublicModel):
    """A model jobs may name: a registry entry, or (``uploaded``) one of the caller's uploads."""

    uploaded: bool = False
    sha256: str | None = Field(None, description="Uploads: SHA-256 of the file as received.")
    size_bytes: int | None = None
    prompt_source: str | None = Field(None, description="Uploads: upload, file_metadata or "
                                      "none.")
    name: str | None = None
    created_at: datetime | None = None


class UploadedModelView(ModelView):
    """What ``POST /models`` answers, and how ``GET /models`` lists an upload."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "up-3f0c6a9e2b7d4c1e8a5f9b0d", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
        "2b0b822cd15d6c15b0f00a08", "kind": "lora", "family": "stable-diffusion",
        "finetuned_from": "sd15", "size_bytes": 3227336, "prompt": "sks style",
        "prompt_source": "upload", "name": "suspect.safetensors", "uploaded": True}]})

    id: str
    sha256: str
    kind: str
    family: str
    finetuned_from: str
    size_bytes: int
    prompt_source: str
    uploaded: bool = True
    filename: str | None = None
    tensors: int = 0
    dtypes: dict[str, int] = {}


class JobSummary(BaseModel):
    """One line of the caller's recent jobs."""

    job_id: str
    status: JobStatus
    created_at: datetime
    finished_at: datetime | None = None
    pretrained: str
    finetuned: str
    images: int
    controls: int
    fraction: float = Field(description="Progress, 0 to 1.")
    status_url: str


class JobList(BaseModel):
    jobs: list[JobSummary]


class ModelList(BaseModel):
    models: list[ModelView | UploadedModelView]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = {}


class SigningKey(BaseModel):
    """One public key of ``/.well-known/cgidm-signing-keys.json`` (cgidm.result_signing)."""

    key_id: str
    algorithm: str
    status: Literal["current", "retired"]
    public_key: str = Field(description="The raw Ed25519 public key, base64.")
    pem: str


class SigningKeySet(BaseModel):
    """The keys that verify this service's signed results, current and retired."""

    scheme: str
    keys: list[SigningKey]


class ErrorItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: list[ErrorItem]
