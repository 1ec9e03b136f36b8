"""Suspects named by hub reference, fetched by the worker (the gateway never downloads weights).

The gateway checked the reference's syntax and the caller's hosts (``CGIDM_MODEL_HOSTS``) and
queued the job; here the worker checks the hosts again, fetches the file through
``cgidm.model_fetch`` into its content-addressed disk cache (``worker.disk_cache``: one download
per file for every worker process of the machine, verified against the published sha256) and
holds it to the same rules as an upload: a safetensors file no larger than
``CGIDM_MAX_MODEL_BYTES`` whose header is consistent and whose tensor names fit the base's family
(``cgidm.model_files``). A file that fails them leaves the cache again. The job's pair is then
keyed on the file's content, as an upload's is, so the same model named twice (or uploaded) is
one cached pair.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cgidm.model_fetch import FetchConfig, ModelFetchError, fetch
from cgidm.model_files import ModelFileError, classify, prompt_from_metadata, read_header
from cgidm.model_refs import AUTO_BASE as AUTO_BASE  # the one definition, shared
from cgidm.model_refs import ModelReferenceError, parse_reference
from cgidm.registry import ModelEntry

if TYPE_CHECKING:  # annotations only
    from worker.context import WorkerContext

log = logging.getLogger("cgidm.worker.remote")


@dataclass
class RemoteModel:
    """A fetched suspect, shaped like an upload's record where the runner reads one."""

    id: str                 # the reference as given
    sha256: str
    kind: str
    family: str
    finetuned_from: str
    size_bytes: int
    prompt: str | None
    prompt_source: str | None
    hub: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"hub:{self.hub.get('canonical', self.id)}"


def fetch_remote(ctx: WorkerContext, reference: str, base: ModelEntry | None,
                 owner: str | None) -> tuple[ModelEntry, RemoteModel]:
    """Fetch, verify and check the suspect ``reference`` names, for a job of ``owner``; with
    ``base`` None, the base is the registered one its hub page names (Civitai's ``baseModel``,
    the model card's ``base_model``, through the registry's base-model table)."""
    try:
        ref = parse_reference(reference)
    except ModelReferenceError as exc:
        raise ModelFetchError("invalid_model_reference", str(exc)) from None
    allowed = ctx.settings.hosts_for(owner)
    if ref.host not in allowed:
        raise ModelFetchError("remote_model_not_allowed", f"models from {ref.host} are not "
                              "allowed for this API key (CGIDM_MODEL_HOSTS)")
    if ctx.disk is None:
        raise ModelFetchError("remote_model_not_allowed", "this worker has no model disk cache")
    config = FetchConfig.from_settings(ctx.settings, allow_snapshot=False)
    fetched = fetch(ref, config, store=ctx.disk.store)
    assert fetched.sha256 is not None  # single files only (allow_snapshot=False)
    if base is None:
        base = ctx.registry().base_for(fetched.base_model)
    try:
        header = read_header(str(fetched.path))
        if header.file_bytes > ctx.settings.max_model_bytes:
            raise ModelFileError("file_too_large", f"{fetched.filename} is {header.file_bytes} "
                                 "bytes, more than CGIDM_MAX_MODEL_BYTES")
        kind = classify(header.names, base.family, metadata=header.metadata)
    except ModelFileError:
        ctx.disk.remove(fetched.sha256)
        raise
    prompt, source = None, None
    if fetched.trained_words:
        prompt, source = ", ".join(fetched.trained_words), "trained_words"
    elif (found := prompt_from_metadata(header.metadata)) is not None:
        prompt, source = found, "file_metadata"
    log.info("suspect %s: %s (%s, %d bytes, sha256 %s%s)", reference, fetched.canonical, kind,
             fetched.size, fetched.sha256, ", cached" if fetched.from_cache else "")
    record = fetched.record()
    if fetched.base_model:
        record["base_model"] = fetched.base_model
    return base, RemoteModel(id=reference, sha256=fetched.sha256, kind=kind, family=base.family,
                             finetuned_from=base.id, size_bytes=fetched.size, prompt=prompt,
                             prompt_source=source, hub=record)


def civitai_lookup(ctx: WorkerContext, finetuned: Any) -> dict[str, Any] | None:
    """For an uploaded suspect, which Civitai version its file is (by sha256), where the
    operator allows the lookup (CGIDM_CIVITAI_HASH_LOOKUP). Best effort: an unreachable API is
    recorded as such and never fails the job."""
    from cgidm.uploaded_models import UploadedModel

    if not (ctx.settings.civitai_hash_lookup and isinstance(finetuned, UploadedModel)):
        return None
    from cgidm.model_fetch import civitai_by_hash

    config = FetchConfig.from_settings(ctx.settings)
    try:
        found = civitai_by_hash(config, finetuned.sha256)
    except Exception as exc:  # noqa: BLE001 - a lookup never fails the job
        log.warning("Civitai lookup of %s failed: %s", finetuned.sha256, exc)
        return {"looked_up": True, "error": getattr(exc, "code", type(exc).__name__)}
    return {"looked_up": True, "found": found is not None, **(found or {})}
