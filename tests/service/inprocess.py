"""The gateway in-process, through FastAPI's TestClient: for route tests where no real server is
the point (validation, auth rules, 4xx bodies). No socket, no uvicorn, no worker; the app is
built by the same ``create_app`` the real gateway runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: The gateway's limits in the service tests, in-process (``app_client``) or over HTTP
#: (``service_env``).
LIMITS = {"max_files": 6, "max_upload_bytes": 200_000, "max_request_bytes": 1_500_000,
          "max_image_pixels": 4_000_000}


@contextmanager
def gateway_in_process(data_dir: Path, registry: Path, headers: dict[str, str] | None = None,
                       **settings: Any) -> Iterator[Any]:
    """A TestClient on a gateway with embedded storage and broker in ``data_dir``, the given
    registry, ``LIMITS`` and any other settings; requests come from 127.0.0.1 (local mode when
    no keys are set). Server exceptions become 500 answers, as over HTTP."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from cgidm.settings import Settings

    config = Settings(data_dir=data_dir, models=str(registry), **{**LIMITS, **settings})
    with TestClient(create_app(config), client=("127.0.0.1", 50000), headers=headers,
                    raise_server_exceptions=False) as http:
        yield http
