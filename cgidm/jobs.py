"""Job records: the documents the gateway and the worker exchange through storage.

Everything about one job lives under ``jobs/<job_id>/``::

    job.json                      the record (status, progress, settings, error, result)
    inputs/000_<name>.png         suspect images, re-encoded as PNG by the gateway
    controls/000_<name>.png       known non-members, if any
    cancel                        marker written by the gateway when a client cancels
    attempts/<tag>/artifacts/<name>/recovered.png | partial.png | side_by_side.png
                                        | base_recovered.png (when computed)
    result.json                   the same document GET /jobs/{id} returns as ``result``

One writer per object keeps this free of races: the gateway writes ``job.json`` once (queued)
before enqueueing, and after that only the worker writes it; the gateway only adds ``cancel``.
A job can run more than once (a worker killed mid-job, a storage outage): each run writes its
pictures under its own ``attempts/<tag>/``, and ``job.json`` is the commit point that names the
run whose pictures are published (``attempt``); the others are deleted, so a job never shows
pictures from two runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from cgidm.errors import CgidmServiceError
from cgidm.storage import ObjectNotFound, Storage, StorageError
from cgidm_core.inversion_config import InversionConfig
from cgidm_core.names import ALL_METRICS, GRADIENT_CHECKPOINTING_MODES, PRESETS
from cgidm_core.names import ARTIFACT_KINDS as ARTIFACT_KINDS
from cgidm_core.names import BASE_RECOVERED as BASE_RECOVERED
from cgidm_core.names import STORED_KINDS as STORED_KINDS

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
Role = Literal["image", "control"]
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_ATTEMPT = re.compile(r"^a[0-9]{1,4}-[0-9a-f]{8}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Control characters other than tab and newline have no place in a prompt.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
#: Stable Diffusion's CLIP tokenizer takes 77 tokens, two of them the start and end markers;
#: every whitespace-separated word is at least one token, so more words can never fit. The
#: worker counts real tokens with the model's tokenizer (the gateway has none).
MAX_PROMPT_WORDS = 75
MAX_PROMPT_CHARS = 1000
#: The settings of the inversion (the library's one definition, torch-free).
INVERSION_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(InversionConfig))


class JobNotFound(CgidmServiceError, LookupError):
    """No job with this id (or not a well-formed job id)."""

    code, http_status = "not_found", 404


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value))


def safe_name(filename: str | None, taken: set[str], fallback: str = "image") -> str:
    """A storage- and URL-safe, unique image name from an upload's file name (without suffix)."""
    stem = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    if "." in stem:
        stem = stem.rsplit(".", 1)[0]
    stem = _UNSAFE.sub("-", stem).strip(".-_")[:80] or fallback
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    taken.add(name)
    return name


# ------------------------------------------------------------------------------------------
# documents


class JobSettings(BaseModel):
    """What a client may choose for a job; ``None`` means the library default."""

    model_config = ConfigDict(extra="ignore")

    pretrained: str = Field(max_length=128, description="Registry id of the pretrained model; "
                            "`auto` with a hub reference as `finetuned`: the registered base its "
                            "hub page records (Civitai's baseModel, the model card's base_model).",
                            examples=["demo-base"])
    finetuned: str = Field(max_length=1000, description="Registry id of the suspect fine-tune, "
                           "the id of your own upload (POST /models), or a hub reference the "
                           "worker fetches where the operator allows it (CGIDM_MODEL_HOSTS): "
                           "hf:OWNER/NAME[@REVISION][:FILE], civitai:VERSION_ID, a huggingface.co "
                           "or civitai.com model page URL, urn:air:...:civitai:MODEL@VERSION.",
                           examples=["demo-vangogh"])
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS,
                               description="Prompt for conditional models (default: the "
                               "registry's instance prompt of the fine-tune). At most "
                               f"{MAX_PROMPT_WORDS} words; the worker fails a job whose prompt "
                               "is longer than the model's tokenizer takes (77 tokens for "
                               "Stable Diffusion) with `prompt_too_long`.")
    # Literal of a tuple constant: pydantic expands it at run time, mypy cannot
    preset: Literal[PRESETS] | None = Field(  # type: ignore[valid-type]
        None, description="reference: the authors' settings (1000 steps, alpha 2, independent "
        "noise, re-encoded partial, unbounded latents), as `cgidm check --preset reference`; "
        "the other settings override it.")
    metric: Literal[ALL_METRICS] | None = Field(  # type: ignore[valid-type]  # runtime tuple
        None, description="Similarity used as the score (clip/dino need CGIDM_FEATURE_MODEL).")
    batch_size: int | None = Field(None, ge=1, le=64, description="Images per PGD batch.")
    steps: int | None = Field(None, ge=1, le=10_000, description="PGD iterations.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Global random seed.")
    alpha: float | None = Field(None, gt=0, le=1000, description="PGD step size (4x64x64 scale).")
    epsilon: float | None = Field(None, gt=0, le=1e6, description="PGD L2 radius (4x64x64 scale).")
    t_min: int | None = Field(None, ge=0, le=999, description="Smallest sampled timestep "
                              "(the models served have 1000 training timesteps: 0-999).")
    t_max: int | None = Field(None, ge=0, le=999, description="Largest sampled timestep.")
    mc_samples: int | None = Field(None, ge=1, le=64, description="Monte Carlo samples per step.")
    common_random_numbers: bool | None = Field(
        None, description="Same timestep and noise for both models (lower variance).")
    reencode_partial: bool | None = Field(
        None, description="Decode and re-encode the partial image, as the reference code does.")
    base_recovery: bool | None = Field(
        None, description="Also recover each image with the base model alone (the same PGD on "
        "its own denoising loss), stored as the `base_recovered` picture and shown beside the "
        "suspect's recovery in the report (default: on; about half the job's time again; no "
        "score changes).")
    cell: int | None = Field(None, ge=1, le=1024, description="Latent pixels per mask square.")
    resolution: int | None = Field(
        None, ge=8, le=4096, description="Pixel side the images are run at (default: the "
        "model's native size, e.g. 1024 for SDXL); smaller is cheaper. A multiple of 32 for "
        "SD/SDXL models.")
    # Literal of a tuple constant: pydantic expands it at run time, mypy cannot
    gradient_checkpointing: Literal[  # type: ignore[valid-type]
        GRADIENT_CHECKPOINTING_MODES] | None = Field(
        None, description="Recompute the denoisers' activations in the backward pass (less GPU "
        "memory, more compute, the same scores); auto (default): only where one image would "
        "not fit the worker's GPU otherwise.")

    @field_validator("prompt")
    @classmethod
    def _prompt_bounded(cls, prompt: str | None) -> str | None:
        if prompt is None:
            return None
        if _CONTROL.search(prompt):
            raise ValueError("the prompt contains control characters; send plain text")
        words = len(prompt.split())
        if words > MAX_PROMPT_WORDS:
            raise ValueError(f"the prompt has {words} words; at most {MAX_PROMPT_WORDS} fit in "
                             "the text encoder (77 tokens for Stable Diffusion)")
        return prompt

    @field_validator("t_max")
    @classmethod
    def _timesteps_ordered(cls, t_max: int | None, info: ValidationInfo) -> int | None:
        t_min = info.data.get("t_min")
        if t_max is not None and t_min is not None and t_min > t_max:
            raise ValueError(f"t_max ({t_max}) must not be smaller than t_min ({t_min})")
        return t_max

    def inversion_overrides(self) -> dict[str, Any]:
        """The InversionConfig fields the client set (the rest keep the library defaults): every
        field of this schema that :class:`~cgidm_core.inversion_config.InversionConfig` has."""
        return {k: getattr(self, k) for k in INVERSION_FIELDS & set(type(self).model_fields)
                if getattr(self, k) is not None}


class Progress(BaseModel):
    fraction: float = Field(0.0, ge=0, le=1)
    steps_done: int = 0
    steps_total: int | None = None
    eta_seconds: float | None = None


class JobError(BaseModel):
    code: str = Field(examples=["bad_setting"])
    message: str


class InputFile(BaseModel):
    name: str
    role: Role
    key: str
    filename: str | None = None
    width: int
    height: int
    frames: int = Field(1, description="Frames in the upload; only the first one is used.")
    sha256: str | None = Field(None, description="SHA-256 of the file as uploaded, before the "
                               "gateway re-encoded it (the provenance of the evidence).")
    content_credentials: dict[str, Any] | None = Field(
        None, description="The upload's own C2PA Content Credentials as the gateway read them "
        "before re-encoding (cgidm/content_credentials.py): signer, claim generator, "
        "training/data-mining assertions and validation state.")


class ArtifactLinks(BaseModel):
    """URLs (relative to the service's base URL) of the pictures of one image."""

    recovered: str
    partial: str
    side_by_side: str
    base_recovered: str | None = Field(
        None, description="The same masked image recovered by the base model alone, when the "
        "job computed it (`base_recovery`, on by default).")


class ImageScore(BaseModel):
    """One image's evidence. ``p_value``/``verdict`` need controls; higher score = more similar."""

    model_config = ConfigDict(extra="allow")

    name: str
    role: Role
    score: float
    metrics: dict[str, float]
    p_value: float | None = None
    evidence_score: float | None = Field(
        None, description="The score the p-value and verdict are computed from (with controls): "
        "by default z(contrast64) + z(the inversion's progress towards the original) over "
        "images and controls together; see the result's `evidence`.")
    verdict: str | None = Field(None, examples=["member_evidence", "no_evidence", "inconclusive"])
    nonfinite_gradient_steps: int = Field(
        0, description="PGD steps skipped for this image because its gradient was not finite "
        "(float16 overflow); 0 normally")
    artifacts: ArtifactLinks


class SetTest(BaseModel):
    """One-sided Mann-Whitney U test: do the images score higher than the controls?"""

    model_config = ConfigDict(extra="allow")

    u_statistic: float
    p_value: float
    auc: float
    alpha: float
    n_suspect: int
    n_controls: int


class JobResult(BaseModel):
    pretrained: str
    finetuned: str
    metric: str
    images: list[ImageScore]
    controls: list[ImageScore] = []
    controls_test: SetTest | None = None
    evidence: dict[str, Any] | None = Field(
        None, description="What the verdicts rest on (cgidm_core.evidence): the score's name, "
        "description and components; each image's `evidence_score` is that score, its p-value "
        "is computed from it against the controls'. `too_small_to_decide`, when present: how "
        "many images and controls the power table says a set-level p < 0.01 needs.")
    config: dict[str, Any] = {}
    pair: dict[str, Any] = {}
    elapsed_seconds: float | None = None
    provenance: dict[str, Any] = Field(
        default_factory=dict, description="What the result was computed from: sha256 of every "
        "image as uploaded and of every model file, prompt and its source, all settings, "
        "versions, device and dtype (`cgidm verify` re-runs it).")
    batch_size_used: int | None = Field(
        None, description="Images per PGD batch the run ended with: the requested (or the "
        "pair's preferred) batch size, halved after each GPU out-of-memory error.")
    oom_halvings: int = Field(0, description="Times the batch was halved after the GPU ran out "
                              "of memory (0: the first batch size fitted).")
    prompt: str | None = Field(None, description="Prompt both models were conditioned on "
                               "(null for models without text).")
    prompt_source: str | None = Field(
        None, description="Where the prompt came from: given, registry, safetensors_metadata "
        "(kohya ss_* keys), model_card (README.md), upload or file_metadata (an uploaded model's "
        "prompt), empty (nothing found: see prompt_warning) or unconditional.")
    prompt_origin: str | None = Field(None, description="File and key the prompt was read from.")
    prompt_warning: str | None = Field(None, description="Set when the empty prompt was used.")
    signature: dict[str, Any] | None = Field(
        None, description="Ed25519 signature of the service over the canonical JSON of this "
        "result less the artifact links (docs/EVIDENCE.md): scheme, key_id, digest, value. "
        "Public keys: GET /.well-known/cgidm-signing-keys.json; `cgidm verify` checks it.")


class Recovery(BaseModel):
    """Why a job runs again: the worker of an earlier attempt was lost (its lease lapsed)."""

    attempt: int = Field(description="The attempt now due (1 is the first delivery).")
    lost_attempts: int = Field(description="Attempts whose worker was lost so far.")
    max_attempts: int = Field(description="Lost attempts after which the job ends failed "
                              "(CGIDM_MAX_ATTEMPTS).")
    lost_at: datetime
    message: str


class JobRecord(BaseModel):
    """``job.json``."""

    job_id: str
    status: JobStatus = "queued"
    progress: Progress = Progress()
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    settings: JobSettings
    owner: str | None = None  # set once API keys exist
    inputs: list[InputFile] = []
    error: JobError | None = None
    result: JobResult | None = None
    worker: dict[str, Any] | None = None
    attempts: int = 0
    attempt: str | None = Field(
        None, description="Which run of the job produced the artifacts (a job that is run again "
        "after a worker died writes each run's pictures apart and publishes one run's).")
    recovering: bool = Field(
        False, description="True while a job whose worker was lost (lease lapsed: killed, out "
        "of memory, machine gone) waits for a worker to run it again; its progress restarts.")
    recovery: Recovery | None = Field(
        None, description="Set once a worker running the job was lost: which attempt is due, "
        "how many were lost, and what happened.")
    queue_key: str | None = Field(
        None, description="What the job's queue was chosen by: the fine-tune's id, or an "
        "uploaded model's content hash. A reaper sends a lost job's next attempt by the same "
        "key, so with CGIDM_ROUTING=pair it reaches the worker that holds the pair.")

    #: The result exactly as ``job.json`` holds it (set by :meth:`JobStore.load`): the document
    #: the worker signed. Served and checked as it is, never re-serialised through
    #: :class:`JobResult`, which would add every field the model gained since it was signed.
    _stored_result: dict[str, Any] | None = PrivateAttr(default=None)

    def result_document(self) -> dict[str, Any] | None:
        """The signed result as stored (a copy), or this process's own result as JSON when the
        record was not read from storage."""
        if self._stored_result is not None:
            return copy.deepcopy(self._stored_result)
        return None if self.result is None else self.result.model_dump(mode="json")

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


# ------------------------------------------------------------------------------------------
# storage layout


def job_prefix(job_id: str) -> str:
    if not is_job_id(job_id):
        raise JobNotFound(job_id)
    return f"jobs/{job_id}/"


def input_key(job_id: str, role: Role, index: int, name: str) -> str:
    folder = "inputs" if role == "image" else "controls"
    return f"{job_prefix(job_id)}{folder}/{index:03d}_{name}.png"


def new_attempt_tag(number: int) -> str:
    """A name for one run of a job: its number and a random part, since two workers that both
    believe they run attempt 2 (a message redelivered while the first still runs) must not
    write into the same folder."""
    return f"a{number}-{uuid.uuid4().hex[:8]}"


def is_attempt_tag(value: str) -> bool:
    return bool(_ATTEMPT.match(value))


def attempts_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}attempts/"


def artifact_key(job_id: str, name: str, kind: str, attempt: str) -> str:
    """Pictures are written under the run that made them; the record names the published run."""
    if not is_attempt_tag(attempt):
        raise ValueError(f"not an attempt tag: {attempt!r}")
    return f"{attempts_prefix(job_id)}{attempt}/artifacts/{name}/{kind}.png"


def artifact_url(job_id: str, name: str, kind: str) -> str:
    return f"/jobs/{job_id}/artifacts/{name}/{kind}.png"


def artifact_links(job_id: str, name: str, base_recovered: bool = False) -> ArtifactLinks:
    kinds = STORED_KINDS if base_recovered else ARTIFACT_KINDS
    return ArtifactLinks(**{kind: artifact_url(job_id, name, kind) for kind in kinds})


class JobStore:
    """Job records on top of a :class:`Storage`."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def create(self, record: JobRecord, files: list[tuple[str, bytes]]) -> None:
        """Inputs first, then ``job.json``: a job that exists always has its inputs. If storage
        fails half-way, what was written is removed again (as far as storage lets us)."""
        try:
            for key, data in files:
                self.storage.put_bytes(key, data, content_type="image/png")
            self.save(record)
        except StorageError:
            self.delete_job_quietly(record.job_id)
            raise

    def delete_job_quietly(self, job_id: str) -> None:
        """Remove every object of a job that was never accepted (best effort)."""
        with contextlib.suppress(StorageError):
            self.storage.delete_prefix(job_prefix(job_id))

    def list_attempts(self, job_id: str) -> list[str]:
        return [name for name in self.storage.list_children(attempts_prefix(job_id))
                if is_attempt_tag(name)]

    def discard_attempts(self, job_id: str, keep: str | None = None) -> None:
        """Delete the pictures of every run of the job but ``keep``."""
        for tag in self.list_attempts(job_id):
            if tag != keep:
                self.storage.delete_prefix(f"{attempts_prefix(job_id)}{tag}/")

    def save(self, record: JobRecord) -> None:
        self.storage.put_json(job_prefix(record.job_id) + "job.json",
                              record.model_dump(mode="json"))

    def load(self, job_id: str) -> JobRecord:
        try:
            document = self.storage.get_json(job_prefix(job_id) + "job.json")
        except ObjectNotFound:
            raise JobNotFound(job_id) from None
        record = JobRecord.model_validate(document)
        if isinstance(document.get("result"), dict):
            record._stored_result = document["result"]
        return record

    def save_result(self, job_id: str, result: JobResult) -> None:
        self.storage.put_json(job_prefix(job_id) + "result.json", result.model_dump(mode="json"))

    def request_cancel(self, job_id: str) -> None:
        self.storage.put_bytes(job_prefix(job_id) + "cancel", utcnow().isoformat().encode())

    def cancel_requested(self, job_id: str) -> bool:
        return self.storage.exists(job_prefix(job_id) + "cancel")

    def read_input(self, key: str) -> bytes:
        return self.storage.get_bytes(key)

    # Each owner's jobs, newest first, without reading every job.json: the gateway adds one
    # empty marker per accepted job, named so that a plain (lexicographic) listing is newest
    # first. Jobs accepted before this index existed are not listed.
    @staticmethod
    def _index_prefix(owner: str | None) -> str:
        return f"index/{_UNSAFE.sub('-', owner) if owner else '_local'}/"

    def index_job(self, record: JobRecord) -> None:
        newest_first = 10**13 - int(record.created_at.timestamp() * 1000)
        self.storage.put_bytes(f"{self._index_prefix(record.owner)}{newest_first:013d}-"
                               f"{record.job_id}", b"")

    def recent_job_ids(self, owner: str | None, limit: int) -> list[str]:
        keys = sorted(self.storage.list(self._index_prefix(owner)))
        ids = [key.rsplit("-", 1)[-1] for key in keys]
        return [job_id for job_id in ids if is_job_id(job_id)][:limit]

    def list_job_ids(self) -> list[str]:
        return [name for name in self.storage.list_children("jobs/") if is_job_id(name)]

    # Worker processes publish their counters here, so any gateway can report them.
    def save_worker_stats(self, worker_id: str, stats: dict[str, Any]) -> None:
        self.storage.put_json(f"workers/{worker_id}.json", stats)

    def load_worker_stats(self) -> list[dict[str, Any]]:
        out = []
        for key in self.storage.list("workers/"):
            try:
                out.append(self.storage.get_json(key))
            except ObjectNotFound:
                continue
        return out


class ResultFileError(CgidmServiceError, ValueError):
    """A file given as a result (``cgidm verify``, ``cgidm report``) is not readable JSON."""

    code = "bad_result_file"


def read_result_file(path: Path) -> Any:
    """The JSON of a result file, with a whole job document (``GET /jobs/{id}``, as ``cgidm
    submit`` saves it) unwrapped to its ``result``: one reading for every command that takes a
    result, so they accept the same files. The caller checks what the document must hold."""
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultFileError(f"{path}: cannot read it as JSON ({exc})") from exc
    if isinstance(document, dict) and isinstance(document.get("result"), dict):
        document = document["result"]
    return document
