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
message from a worker killed with SIGKILL. Job leases do, with either broker (cgidm/leases.py:
a SQLite file next to the broker's here, the broker's Redis in production), long before Redis's
own visibility timeout would.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cgidm_core.names import DTYPES

ENV_PREFIX = "CGIDM_"
_KEY_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def is_loopback_host(host: str | None) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_api_keys(value: str | None) -> dict[str, str]:
    """``name:<sha256 hex>,name2:<...>`` as {name: hash}; ValueError names the bad entry.

    Only hashes are configured, so the settings (environment, compose files, process listings)
    never hold a usable key.
    """
    keys: dict[str, str] = {}
    for raw in (value or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, digest = entry.partition(":")
        name, digest = name.strip(), digest.strip().lower()
        if not sep or not _KEY_NAME.match(name):
            raise ValueError(
                f"CGIDM_API_KEYS entry {entry[:20]!r}...: expected NAME:SHA256HEX with NAME made "
                "of letters, digits, '.', '_' or '-' (cgidm keys new NAME prints one)"
            )
        if not _SHA256_HEX.match(digest):
            raise ValueError(
                f"CGIDM_API_KEYS entry for {name!r}: the part after ':' must be the 64-character "
                "SHA-256 hex digest of the key, not the key itself (cgidm keys new NAME prints it)"
            )
        if name in keys:
            raise ValueError(f"CGIDM_API_KEYS names {name!r} twice")
        keys[name] = digest
    return keys


#: The hosts a hub reference can name (cgidm.model_refs.SITE_HOSTS).
REFERENCE_HOSTS = ("huggingface.co", "civitai.com")


def parse_model_hosts(value: str | None) -> dict[str, frozenset[str]]:
    """``TENANT=HOST+HOST,...`` as {tenant: hosts}; ValueError names the bad entry."""
    table: dict[str, frozenset[str]] = {}
    for raw in (value or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        tenant, sep, hosts = entry.partition("=")
        tenant = tenant.strip()
        names = frozenset(h.strip().lower() for h in hosts.split("+") if h.strip())
        if not sep or not (tenant == "*" or _KEY_NAME.match(tenant)):
            raise ValueError(f"CGIDM_MODEL_HOSTS entry {entry[:40]!r}: expected TENANT=HOST[+HOST] "
                             "with TENANT a key name, `local` or `*`")
        unknown = names - set(REFERENCE_HOSTS)
        if unknown or not names:
            raise ValueError(f"CGIDM_MODEL_HOSTS entry {entry[:40]!r}: hosts must be among "
                             f"{', '.join(REFERENCE_HOSTS)}")
        if tenant in table:
            raise ValueError(f"CGIDM_MODEL_HOSTS names {tenant!r} twice")
        table[tenant] = names
    return table


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
    # Literal of a tuple constant: pydantic expands it at run time, mypy cannot
    dtype: Literal[DTYPES] | None = Field(  # type: ignore[valid-type]
        None, description="Compute dtype of the models (default: float16 on GPU, float32 on CPU)."
    )
    feature_model: Path | None = Field(
        None,
        description="Local folder of a CLIP/DINO vision model; enables metric=clip or dino.",
    )
    max_upload_bytes: int = Field(
        20 * 1024**2, ge=1, description="Largest accepted image file, in bytes."
    )
    max_model_bytes: int = Field(
        8 * 1024**3, ge=1024,
        description="Largest accepted model upload (POST /models), in bytes; 413 above, "
        "enforced while the file streams in. The default takes an SDXL-sized single-file "
        "checkpoint (about 7 GB).",
    )
    model_cache_dir: Path | None = Field(
        None,
        description="Worker: folder of the content-addressed disk cache of uploaded models "
        "(default: <CGIDM_DATA_DIR>/model-cache). Worker processes on one machine may share it.",
    )
    model_disk_bytes: int = Field(
        50 * 1024**3, ge=0,
        description="Worker: byte budget of that disk cache; least recently used files are "
        "removed to stay under it (a file in use is kept).",
    )
    civitai_url: str = Field(
        "https://civitai.com", pattern=r"^https?://[^\s]+$",
        description="Base URL of the Civitai API that civitai: references are fetched from "
        "(GET /api/v1/model-versions/{id}, then the file's downloadUrl).",
    )
    civitai_token: str | None = Field(
        None, repr=False,
        description="Civitai API token, sent as `Authorization: Bearer`; needed for models that "
        "require a login to download (create one under civitai.com, Account settings, API Keys). "
        "Hugging Face reads its own HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE.",
    )
    model_hosts: str | None = Field(
        None,
        description="Which callers may name suspect models by hub reference (hf:..., civitai:..., "
        "a model page URL), and from which hosts: TENANT=HOST[+HOST] entries separated by commas, "
        "TENANT a key name, `local` (keyless local mode) or `*` (everyone), HOST huggingface.co "
        "or civitai.com. Unset: no references are accepted; workers fetch, the gateway never "
        "does. Example: `*=huggingface.co+civitai.com`.",
    )
    civitai_hash_lookup: bool = Field(
        False, description="Look local and uploaded suspect files up on Civitai by sha256 "
        "(GET /api/v1/model-versions/by-hash) and record the version found in the result.",
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
    routing: Literal["shared", "pair"] = Field(
        "shared", description="shared: one queue, any free worker takes the next job. pair: "
        "jobs of a model pair go to the one worker that owns its slot, which keeps it loaded "
        "(see cgidm/queue_routing.py and docs/SERVICE.md, Scaling out).")
    routing_slots: int = Field(
        16, ge=1, le=1024, description="Slot queues pairs are hashed onto with routing=pair; "
        "at least the number of workers. Gateway and workers must agree.")
    routing_member_ttl: float = Field(
        15.0, ge=2, le=600, description="routing=pair: seconds without a heartbeat after which "
        "a worker counts as gone and the others take over its slots.")
    api_keys: str | None = Field(
        None,
        description="API keys allowed to use the service: NAME:SHA256HEX entries separated by "
        "commas (`cgidm keys new NAME` prints one). Unset: no keys, and the gateway answers only "
        "requests from this machine (loopback).",
    )
    url_signing_key: str | None = Field(
        None,
        min_length=16,
        description="Secret that signs the artifact URLs handed out in job results (default: "
        "derived from CGIDM_API_KEYS). Set the same value on every gateway replica.",
    )
    signing_key: Path | None = Field(
        None,
        description="Ed25519 private key (PEM) the workers sign every result with; the gateway "
        "publishes its public key at /.well-known/cgidm-signing-keys.json (default: "
        "<CGIDM_DATA_DIR>/signing-key.pem, made on first use). Give every worker and gateway "
        "the same file (a mounted secret); `cgidm keys signing --key PATH` makes one.",
    )
    signing_public_keys: str | None = Field(
        None,
        description="PEM public key files of retired signing keys, separated by commas: still "
        "published, so results signed before a rotation keep verifying.",
    )
    artifact_url_ttl: int = Field(
        3600, ge=10, le=7 * 24 * 3600, description="Seconds a signed artifact URL stays valid."
    )
    max_request_bytes: int = Field(
        256 * 1024**2, ge=1024,
        description="Largest accepted request body, in bytes (413 above, enforced while "
        "the body streams in).",
    )
    max_queue_depth: int = Field(
        1000, ge=1,
        description="Jobs waiting in the queue above which submissions get 429 + Retry-After.",
    )
    queue_retry_after: int = Field(
        30, ge=1, le=3600, description="Retry-After seconds sent with a 429 (queue full)."
    )
    visibility_timeout: int | None = Field(
        None, ge=2,
        description="Redis broker: seconds after which a job whose worker vanished (SIGKILL, "
        "OOM, lost machine) is delivered again. Must exceed CGIDM_TASK_TIME_LIMIT, so a job "
        "still running is never started twice (default: CGIDM_TASK_TIME_LIMIT + 600).",
    )
    lease_ttl: float = Field(
        60.0, ge=2, le=3600,
        description="Seconds a running job's lease lasts without a heartbeat. A job whose "
        "worker vanished (SIGKILL, OOM killer, lost machine) is handed out again this long "
        "after the last heartbeat (plus up to CGIDM_REAPER_INTERVAL), whatever the job's length.",
    )
    lease_heartbeat: float = Field(
        10.0, gt=0, le=600,
        description="Seconds between two renewals of a running job's lease, by a thread of the "
        "worker that does not wait for PGD progress; must be under half of CGIDM_LEASE_TTL.",
    )
    reaper_interval: float = Field(
        5.0, gt=0, le=600,
        description="Seconds between two looks for lapsed leases, by the reaper that runs in "
        "every worker and gateway process.",
    )
    max_attempts: int = Field(
        3, ge=1, le=100,
        description="Lapsed attempts (the worker lost while running the job) after which a job "
        "ends failed with code worker_lost instead of being handed out again.",
    )
    storage_retries: int = Field(
        5, ge=0, le=20,
        description="Times a job is retried (from the start) when storage fails under it, "
        "before it is marked failed with storage_unavailable.",
    )
    storage_retry_backoff: int = Field(
        2, ge=1, le=600, description="Wait before the first such retry, in seconds; doubles "
        "with each retry (full jitter: a random wait up to that bound).",
    )
    storage_retry_backoff_max: int = Field(
        120, ge=1, le=3600, description="Longest wait between two such retries, in seconds."
    )

    @field_validator("storage_url", "s3_endpoint_url", "broker_url", "models", "device", "dtype",
                     "feature_model", "api_keys", "model_cache_dir", "url_signing_key",
                     "visibility_timeout", "civitai_token", "model_hosts", "signing_key",
                     "signing_public_keys", mode="before")
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
        if self.visibility_timeout is not None and \
                self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                "CGIDM_VISIBILITY_TIMEOUT must be larger than CGIDM_TASK_TIME_LIMIT: a shorter "
                "one hands a job that is still running to a second worker"
            )
        if self.lease_heartbeat * 2 > self.lease_ttl:
            raise ValueError(
                "CGIDM_LEASE_HEARTBEAT must be at most half of CGIDM_LEASE_TTL, so one late or "
                "lost heartbeat does not make a running job look abandoned"
            )
        return self

    @field_validator("api_keys")
    @classmethod
    def _keys_well_formed(cls, value: str | None) -> str | None:
        parse_api_keys(value)
        return value

    @field_validator("model_hosts")
    @classmethod
    def _hosts_well_formed(cls, value: str | None) -> str | None:
        parse_model_hosts(value)
        return value

    def hosts_for(self, tenant: str | None) -> frozenset[str]:
        """The hosts ``tenant`` (a key name; None in the keyless local mode) may name suspect
        models on."""
        table = parse_model_hosts(self.model_hosts)
        return table.get("local" if tenant is None else tenant, table.get("*", frozenset()))

    @property
    def api_key_hashes(self) -> dict[str, str]:
        """{key name: SHA-256 hex of the key}; empty when no keys are configured."""
        return parse_api_keys(self.api_keys)

    @property
    def resolved_visibility_timeout(self) -> int:
        return self.visibility_timeout or self.task_time_limit + 600

    @property
    def resolved_model_cache_dir(self) -> Path:
        return (self.model_cache_dir or self.data_dir / "model-cache").expanduser().resolve()

    @property
    def resolved_signing_key(self) -> Path:
        return (self.signing_key or self.data_dir / "signing-key.pem").expanduser().resolve()

    @property
    def retired_public_keys(self) -> list[Path]:
        return [Path(p.strip()) for p in (self.signing_public_keys or "").split(",") if p.strip()]

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
