"""Models that users upload (``POST /models``): their records, their files, who may use them.

An upload belongs to the API key that made it. Everything of one key lives under its own
prefix, so no listing or lookup of one key can reach another key's uploads::

    models/<owner>/records/<model id>.json      the record (UploadedModel)
    models/<owner>/blobs/<upload id>.safetensors the file, exactly as received

``<owner>`` is ``k-<key name>`` (``local`` for the keyless local mode). A model's id is derived
from its owner and the file's sha256, so the same file uploaded twice by one key is one model,
while two keys uploading the same file get two unrelated ids (an id tells nothing about another
key's files). Jobs name an upload by this id wherever they accept a registry id;
:class:`ModelResolver` is the one place that looks an id up, for the gateway and the worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from cgidm.registry import ModelEntry, Registry, UnknownModel, check_reference
from cgidm.storage import ObjectNotFound, Storage, StorageError

UPLOAD_ID = re.compile(r"^up-[0-9a-f]{24}$")
PromptSource = Literal["upload", "file_metadata", "none"]


class UploadedModel(BaseModel):
    """The record of one uploaded model (``models/<owner>/records/<id>.json``)."""

    id: str = Field(examples=["up-3f0c6a9e2b7d4c1e8a5f9b0d"])
    sha256: str = Field(description="SHA-256 of the file as received.")
    kind: str = Field(description="lora, single_file or unet.", examples=["lora"])
    family: str = Field(description="The base's family.", examples=["stable-diffusion"])
    finetuned_from: str = Field(description="Registry id of the base model.")
    size_bytes: int
    prompt: str | None = Field(None, description="Instance prompt used when a job gives none.")
    prompt_source: PromptSource = Field(
        "none", description="Where the prompt came from: the upload's `prompt` field, the "
        "file's safetensors metadata, or nowhere.")
    name: str | None = Field(None, description="The uploader's label (or the file name).")
    filename: str | None = None
    created_at: datetime
    tensors: int = Field(0, description="Tensors in the file.")
    dtypes: dict[str, int] = Field(default_factory=dict, description="Tensors per dtype.")
    owner: str | None = Field(None, exclude=True)
    blob_key: str = Field("", exclude=True)

    @property
    def path(self) -> str:  # duck-types with ModelEntry where a path is shown in errors
        return f"upload:{self.id}"


def owner_prefix(owner: str | None) -> str:
    """Storage prefix of one key's uploads (key names are storage-safe; ``k-`` keeps a key
    named ``.`` or ``..`` a valid segment)."""
    return f"models/{'local' if owner is None else 'k-' + owner}/"


def model_id(owner: str | None, sha256: str) -> str:
    digest = hashlib.sha256(f"{owner_prefix(owner)}\0{sha256}".encode()).hexdigest()
    return f"up-{digest[:24]}"


def is_upload_id(value: str) -> bool:
    return bool(UPLOAD_ID.match(value))


def new_blob_key(owner: str | None) -> str:
    return f"{owner_prefix(owner)}blobs/{uuid.uuid4().hex}.safetensors"


class UploadStore:
    """Upload records and files on top of a :class:`Storage`."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def _record_key(self, owner: str | None, model_id: str) -> str:
        return f"{owner_prefix(owner)}records/{model_id}.json"

    def get(self, owner: str | None, ref: str) -> UploadedModel:
        """The caller's upload ``ref``; :class:`UnknownModel` for another key's (same answer as
        for an id that does not exist)."""
        if not is_upload_id(ref):
            raise UnknownModel(f"unknown model id {ref!r}")
        try:
            document = self.storage.get_json(self._record_key(owner, ref))
        except ObjectNotFound:
            raise UnknownModel(f"unknown model id {ref!r}; see GET /models for your "
                               "uploads and the registered models") from None
        record = UploadedModel.model_validate(document)
        record.owner = owner
        record.blob_key = document.get("blob_key", "")
        return record

    def find(self, owner: str | None, ref: str) -> UploadedModel | None:
        try:
            return self.get(owner, ref)
        except UnknownModel:
            return None

    def save(self, record: UploadedModel) -> None:
        document = record.model_dump(mode="json")
        document["blob_key"] = record.blob_key
        self.storage.put_json(self._record_key(record.owner, record.id), document)

    def list(self, owner: str | None) -> list[UploadedModel]:
        out = []
        for key in self.storage.list(f"{owner_prefix(owner)}records/"):
            ref = key.rsplit("/", 1)[-1].removesuffix(".json")
            found = self.find(owner, ref)
            if found is not None:
                out.append(found)
        return sorted(out, key=lambda r: r.created_at)

    def delete(self, record: UploadedModel) -> None:
        """The record first: once it is gone no new job can name the model."""
        self.storage.delete(self._record_key(record.owner, record.id))
        if record.blob_key:
            self.storage.delete(record.blob_key)

    def discard_blob(self, key: str) -> None:
        with contextlib.suppress(StorageError):
            self.storage.delete(key)


class ModelResolver:
    """Resolves model ids for one caller: the registry first, then the caller's uploads."""

    def __init__(self, registry: Registry, uploads: UploadStore, owner: str | None):
        self.registry, self.uploads, self.owner = registry, uploads, owner

    def get(self, ref: str) -> ModelEntry | UploadedModel:
        check_reference(ref)
        if ref in self.registry.entries or not is_upload_id(ref):
            return self.registry.get(ref)
        return self.uploads.get(self.owner, ref)

    def check_pair(self, pretrained: str, finetuned: str
                   ) -> tuple[ModelEntry, ModelEntry | UploadedModel]:
        """Both models; an upload may only be the fine-tune, and only of its own base."""
        base = self.get(pretrained)
        if isinstance(base, UploadedModel):
            raise UnknownModel(f"{pretrained!r} is an uploaded fine-tune; the pretrained model "
                               "must be a registered base (GET /models)")
        tuned = self.get(finetuned)
        if isinstance(tuned, UploadedModel):
            if tuned.finetuned_from != base.id:
                raise UnknownModel(
                    f"{tuned.id!r} was uploaded as a fine-tune of {tuned.finetuned_from!r}, not "
                    f"{base.id!r}; compare a fine-tune with its own base model")
            return base, tuned
        return self.registry.check_pair(pretrained, finetuned)
