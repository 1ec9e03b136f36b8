"""Health, readiness, metrics and the public keys that verify results (models:
app/routes_models.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.errors import ApiError
from app.metrics import ServiceCollector
from app.schemas import ErrorBody, Health, SigningKeySet
from app.services import Services, ServicesDep
from cgidm.job_queue import BrokerUnavailable
from cgidm.result_signing import WELL_KNOWN_PATH, SigningKeyError, key_set, load_or_create_key
from cgidm.storage import StorageError

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The gateway process is up")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health,
            responses={503: {"model": Health, "description": "Broker or storage unreachable."}},
            summary="Broker and storage are reachable")
def readyz(services: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        services.store.storage.ping()
        checks["storage"] = "ok"
    except StorageError as exc:
        checks["storage"] = f"unavailable: {exc}"
    try:
        services.queue_depth()
        checks["broker"] = "ok"
    except BrokerUnavailable as exc:
        checks["broker"] = f"unavailable: {exc}"
    ready = all(value == "ok" for value in checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(WELL_KNOWN_PATH, summary="The public keys that verify this service's results",
            responses={200: {"model": SigningKeySet},
                       503: {"model": ErrorBody, "description": "The signing key cannot be read."}})
def signing_keys(services: ServicesDep) -> JSONResponse:
    """Ed25519 public keys (current and retired, by key id) of the signatures in job results;
    no API key needed. Save it to a file and give it to `cgidm verify --public-key`."""
    settings = services.settings
    try:
        keys = key_set(load_or_create_key(settings.resolved_signing_key),
                       settings.retired_public_keys)
    except SigningKeyError as exc:
        raise ApiError(503, [], "signing_key_unavailable", str(exc)) from exc
    return JSONResponse(keys, headers={"Cache-Control": "public, max-age=300"})


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "The Prometheus text format."}})
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def metrics_registry(services: Services) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(services))
    return registry
