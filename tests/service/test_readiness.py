"""A gateway whose broker is down: not ready (503), and submissions fail cleanly with 503.

The gateway runs in-process (FastAPI's TestClient): the answers are the route's contract, and
the broker it cannot reach is a closed port on this machine, whoever asks."""

from __future__ import annotations

import pytest

from cgidm_testkit.processes import free_port, png_bytes
from tests.service.inprocess import gateway_in_process


@pytest.fixture(scope="module")
def broken_gateway(tmp_path_factory, registry_file):
    with gateway_in_process(tmp_path_factory.mktemp("broken"), registry_file,
                            broker_url=f"redis://127.0.0.1:{free_port()}/0") as client:
        yield client


def test_not_ready_without_broker(broken_gateway):
    response = broken_gateway.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["storage"] == "ok" and checks["broker"].startswith("unavailable")
    assert "cgidm_broker_up 0.0" in broken_gateway.get("/metrics").text


def test_submission_without_broker_is_503_and_stores_nothing(broken_gateway):
    response = broken_gateway.post(
        "/authenticate", data={"pretrained": "tiny-base", "finetuned": "tiny-ft"},
        files=[("images", ("a.png", png_bytes(1), "image/png"))])
    assert response.status_code == 503, response.text
    assert response.json()["detail"][0]["type"] == "broker_unavailable"
    # refused before the body was read: no job record, no input, queued or failed
    metrics = broken_gateway.get("/metrics").text
    for state in ("queued", "failed", "running", "succeeded"):
        assert f'cgidm_jobs{{state="{state}"}} 0.0' in metrics
