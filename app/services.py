"""What the request handlers need, built once per gateway process from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from app.admission import Admission, admission_for
from app.auth import UrlSigner
from cgidm.job_queue import enqueue_job, make_celery, waiting_jobs
from cgidm.jobs import JobStore
from cgidm.registry import Registry, load_registry
from cgidm.settings import Settings
from cgidm.storage import storage_from_settings
from cgidm.uploaded_models import ModelResolver, UploadStore


@dataclass
class Services:
    settings: Settings
    store: JobStore
    celery: Any
    signer: UrlSigner
    admission: Admission

    @classmethod
    def create(cls, settings: Settings) -> Services:
        load_registry(settings.models)  # a broken registry stops the gateway at start-up
        return cls(settings, JobStore(storage_from_settings(settings)),
                   make_celery(settings, main="gateway"), UrlSigner(settings),
                   admission_for(settings.resolved_broker_url, settings.queue))

    def registry(self) -> Registry:
        return load_registry(self.settings.models)

    @property
    def uploads(self) -> UploadStore:
        """Uploaded models, in the same storage as the jobs."""
        return UploadStore(self.store.storage)

    def resolver(self, owner: str | None) -> ModelResolver:
        """Model ids as ``owner`` sees them: the registry and their own uploads."""
        return ModelResolver(self.registry(), self.uploads, owner)

    def enqueue(self, job_id: str, pretrained: str = "", finetuned: str = "") -> None:
        """Send the job by task name; the gateway never imports the worker's code. The queue
        depends on the pair with CGIDM_ROUTING=pair (cgidm/queue_routing.py)."""
        enqueue_job(self.celery, self.settings, job_id, 1, pretrained, finetuned)

    def queue_depth(self) -> int:
        """Messages waiting in the job queues (plain and slots); raises
        :class:`~cgidm.job_queue.BrokerUnavailable` if the broker cannot be reached."""
        return waiting_jobs(self.celery, self.settings)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


#: A route's parameter ``services: ServicesDep`` receives the app's :class:`Services`.
ServicesDep = Annotated[Services, Depends(get_services)]
