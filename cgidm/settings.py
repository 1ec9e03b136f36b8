"""The service's one settings object, read from ``CGIDM_*`` environment variables.

Every deployment runs the same code; only these values differ. Left unset, they describe the
embedded default that ``cgidm serve`` runs with no servers at all: a local folder for storage
and a SQLite file as the Celery broker, both under ``CGIDM_DATA_DIR``. docker-compose sets the
same names to Redis and MinIO. The table in docs/SERVICE.md documents each field; a test checks
that docker-compose.yml only uses names defined here.

Why SQLite (kombu's ``sqla+sqlite`` transport) and not kombu's ``filesystem://`` transport for
the embedded broker: the gateway and the worker are separate processes. The filesystem transport
creates a message file and then writes into it, and its consumer claims files by moving them
without taking the writer's lock, so a worker can claim a half-written (empty) message; the SQL
transport publishes in one transaction and claims a message inside ``BEGIN IMMEDIATE``, so each
message is seen whole by exactly one consumer. Both keep unacknowledged messages in the worker's
memory and put them back when the worker shuts down (warm or cold); neither can recover a
message from a worker killed with SIGKILL; Redis (production) can, through its visibility timeout.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "CGIDM_"


class Settings(BaseSettings):
    """Service settings; each field is the environment variable ``CGIDM_<FIELD NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    data_dir: Path = Field(
        Path("cgidm-data"),
        description="Folder for the embedded defaults: local storage and the SQLite broker.",
    )
    storage_url: str | None = Field(
        None,
        description="Where jobs, inputs and artifacts live: file:///abs/path or s3://bucket/prefix "
        "(default: file://<CGIDM_DATA_DIR>/storage).",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="S3 endpoint for MinIO or another S3-compatible server (default: AWS). "
        "Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION.",
    )
    s3_max_attempts: int = Field(5, ge=1, le=20, description="botocore attempts per S3 call.")
    broker_url: str | None = Field(
        None,
        description="Celery broker, e.g. redis://redis:6379/0 "
        "(default: sqla+sqlite:///<CGIDM_DATA_DIR>/broker.sqlite, needs no server).",
    )
    models: Path | None = Field(
        None,
        description="Model registry JSON file (default: the built-in demo pair "
        "demo-base / demo-vangogh).",
    )
    model_cache_bytes: int = Field(
        8 * 1024**3, ge=0, description="Memory budget of the worker's model-pair LRU cache."
    )
    device: str | None = Field(
        None, description="Torch device of the worker: cuda, cuda:1, cpu (default: cuda if any)."
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Compute dtype of the models (default: float16 on GPU, float32 on CPU)."
    )
    feature_model: Path | None = Field(
        None,
        description="Local folder of a CLIP/DINO vision model; enables metric=clip or dino.",
    )
    max_upload_bytes: int = Field(
        20 * 1024**2, ge=1, description="Largest accepted image file, in bytes."
    )
    max_files: int = Field(64, ge=1, description="Most files (images + controls) per job.")
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Largest accepted image, in pixels (width x height)."
    )
    task_soft_time_limit: int = Field(
        3600, ge=1, description="Seconds after which a job is stopped and marked failed."
    )
    task_time_limit: int = Field(
        3900,
        ge=1,
        description="Seconds after which the worker child running a job is killed "
        "(prefork pool only); must exceed the soft limit.",
    )
    progress_interval: float = Field(
        1.0, ge=0, description="Least seconds between two progress writes of a running job."
    )
    cancel_check_interval: float = Field(
        0.5, ge=0, description="Least seconds between two checks for a cancel request."
    )
    controls_alpha: float = Field(
        0.05, gt=0, lt=1, description="Significance level of the controls test and verdicts."
    )
    queue: str = Field("cgidm", pattern=r"^[A-Za-z0-9._-]+$", description="Celery queue name.")

    @field_validator("storage_url", "s3_endpoint_url", "broker_url", "models", "device", "dtype",
                     "feature_model", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker-compose passes `${VAR:-}` through as an empty string: treat it as "not set".
        return None if value == "" else value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Resolved once, so the gateway and worker processes of `cgidm serve` agree on it.
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _limits_ordered(self) -> Settings:
        if self.task_time_limit <= self.task_soft_time_limit:
            raise ValueError(
                "CGIDM_TASK_TIME_LIMIT must be larger than CGIDM_TASK_SOFT_TIME_LIMIT, so the "
                "soft limit can end a job cleanly before the hard limit kills it"
            )
        return self

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_dir / "storage").as_uri()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"

    @property
    def embedded_broker(self) -> bool:
        """True when the broker is a local SQLite file (no server to reach)."""
        return self.resolved_broker_url.startswith("sqla+sqlite:")

    def as_environment(self) -> dict[str, str]:
        """These settings as ``CGIDM_*`` variables, to hand them to child processes unchanged."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is not None:
                env[ENV_PREFIX + name.upper()] = str(value)
        env[ENV_PREFIX + "STORAGE_URL"] = self.resolved_storage_url
        env[ENV_PREFIX + "BROKER_URL"] = self.resolved_broker_url
        return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()


def setting_env_names() -> set[str]:
    """Every environment variable the settings read (for documentation and compose checks)."""
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}
