"""Models: the registry, and the suspect models callers upload themselves (``POST /models``).

An upload belongs to the key that made it: every route answers 404 for another key's upload,
exactly as for an id that does not exist. ``POST /authenticate`` accepts an upload's id as
``finetuned`` (see ``cgidm.uploaded_models.ModelResolver``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response

from app.auth import Caller, CallerDep
from app.errors import ApiError, storage_unavailable
from app.model_upload import FILE_FIELD, TEXT_FIELDS, ModelUpload
from app.schemas import ErrorBody, ModelList, ModelView, UploadedModelView
from app.services import Services, ServicesDep
from cgidm.model_files import UPLOAD_KINDS
from cgidm.registry import UnknownModel
from cgidm.storage import StorageError
from cgidm.uploaded_models import UploadedModel, is_upload_id

router = APIRouter(tags=["models"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key, or an unknown one."},
    403: {"model": ErrorBody, "description": "No keys are configured and the caller is not on "
          "this machine."},
}
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [FILE_FIELD, "finetuned_from"],
        "properties": {
            FILE_FIELD: {"type": "string", "format": "binary", "description":
                         "The suspect model as .safetensors: LoRA weights, a single-file "
                         "checkpoint, or fine-tuned UNet weights. Pickle files are refused."},
            "finetuned_from": {"type": "string", "maxLength": 128, "description":
                               "Registry id of the base model it was fine-tuned from."},
            "name": {"type": "string", "maxLength": 200, "description": "A label for you."},
            "kind": {"type": "string", "enum": list(UPLOAD_KINDS),
                     "description": "What the file holds (detected when omitted)."},
            "prompt": {"type": "string", "maxLength": 1000, "description":
                       "Instance prompt used when a job gives none (default: the file's "
                       "metadata, if it has one)."},
        }}}}},
}
assert set(_UPLOAD_BODY["requestBody"]["content"]["multipart/form-data"]["schema"]
           ["properties"]) == {FILE_FIELD, *TEXT_FIELDS}


def _view(model: UploadedModel) -> UploadedModelView:
    return UploadedModelView(**model.model_dump(), uploaded=True)


def _not_found(model_id: str) -> ApiError:
    return ApiError(404, ["path", "model_id"], "not_found", f"no model with id {model_id!r}")


def _own_upload(services: Services, caller: Caller, model_id: str) -> UploadedModel:
    if not is_upload_id(model_id):
        raise _not_found(model_id)
    try:
        return services.uploads.get(caller.name, model_id)
    except UnknownModel:
        raise _not_found(model_id) from None
    except StorageError as exc:
        raise storage_unavailable(exc) from exc


@router.post(
    "/models",
    status_code=201,
    response_model=UploadedModelView,
    openapi_extra=_UPLOAD_BODY,
    responses={**_ERRORS,
               200: {"model": UploadedModelView, "description": "You had uploaded this file "
                     "already (same sha256): the existing model."},
               409: {"model": ErrorBody, "description": "You uploaded this file already as a "
                     "fine-tune of another base."},
               413: {"model": ErrorBody, "description": "Larger than CGIDM_MAX_MODEL_BYTES "
                     "(refused while it streams in; nothing is stored)."},
               415: {"model": ErrorBody, "description": "A pickle checkpoint (.ckpt, .bin, .pt) "
                     "or not a multipart body."},
               422: {"model": ErrorBody, "description": "Not a valid safetensors file, or its "
                     "tensors do not fit the base's family or the kind; `type` says which."},
               503: {"model": ErrorBody, "description": "Storage unavailable; nothing stored."}},
    summary="Upload a suspect model (.safetensors) to check it against a registered base",
)
async def upload_model(request: Request, services: ServicesDep,
                       caller: CallerDep) -> JSONResponse:
    """The file streams to storage as it arrives (never held in memory), is hashed, and is
    validated without loading it: a well-formed safetensors header whose tensor names fit the
    base's family and the kind. The answer's `id` works as `finetuned` in `POST /authenticate`,
    for this API key only."""
    upload = ModelUpload(services.registry(), services.uploads, caller.name,
                         services.settings.max_model_bytes)
    outcome = await upload.receive(request)
    body = _view(outcome.model).model_dump(mode="json")
    status = 201 if outcome.created else 200
    return JSONResponse(body, status_code=status,
                        headers={"Location": f"/models/{outcome.model.id}"})


@router.get("/models", response_model=ModelList, responses=_ERRORS,
            summary="Models jobs may reference: the registry and your uploads")
def list_models(services: ServicesDep,
                caller: CallerDep) -> ModelList:
    """Needs an API key like the job routes; health, readiness, metrics and the docs do not."""
    models = [ModelView(**m.model_dump()) for m in services.registry().public()]
    try:
        models += [_view(m) for m in services.uploads.list(caller.name)]
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    return ModelList(models=models)


ModelId = Annotated[str, Path(max_length=128)]


@router.get("/models/{model_id}", response_model=ModelView,
            responses={**_ERRORS, 404: {"model": ErrorBody, "description": "No such model "
                                        "(or another key's upload)."}},
            summary="One model: a registry entry or one of your uploads")
def get_model(model_id: ModelId, services: ServicesDep,
              caller: CallerDep) -> ModelView:
    entry = services.registry().entries.get(model_id)
    if entry is not None:
        return ModelView(**entry.model_dump(exclude={"path"}))
    return _view(_own_upload(services, caller, model_id))


@router.delete("/models/{model_id}", status_code=204,
               responses={**_ERRORS,
                          403: {"model": ErrorBody, "description": "A registry model (the "
                                "operator manages those)."},
                          404: {"model": ErrorBody, "description": "No such upload (or another "
                                "key's)."}},
               summary="Delete one of your uploads (finished jobs keep their records)")
def delete_model(model_id: ModelId, services: ServicesDep,
                 caller: CallerDep) -> Response:
    if model_id in services.registry().entries:
        raise ApiError(403, ["path", "model_id"], "registry_model",
                       f"{model_id!r} is a registry model; only uploads can be deleted")
    model = _own_upload(services, caller, model_id)
    try:
        services.uploads.delete(model)
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    return Response(status_code=204)
