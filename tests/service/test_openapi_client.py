"""The HTTP contract as client generators read it (app/openapi.py).

These tests read the document of the in-process gateway: operations named by their route
functions, multipart bodies flat with binary file arrays, and a schema for every response that
is not JSON. The user's path, a client that openapi-python-client generates from the live
service's /openapi.json (over real HTTP, into a temporary folder; never committed) running a
check of the demo pair with files, is test_web_browser.py's
``test_a_client_generated_from_the_spec_checks_the_demo_pair_with_a_key``: it reuses that
module's ``cgidm serve`` with API keys and the built-in demo registry, which the stack of
conftest.py (tiny models only) does not have.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from cgidm.jobs import JobSettings

#: What a generated client calls each operation; renaming one breaks every client made before.
OPERATIONS = {
    ("post", "/authenticate"): "authenticate",
    ("get", "/jobs"): "list_jobs",
    ("get", "/jobs/{job_id}"): "get_job",
    ("delete", "/jobs/{job_id}"): "cancel_job",
    ("get", "/jobs/{job_id}/artifacts/{name}/{filename}"): "get_artifact",
    ("get", "/jobs/{job_id}/report.html"): "evidence_report",
    ("get", "/jobs/{job_id}/report.pdf"): "evidence_report_pdf",
    ("get", "/audits/{audit_id}/report.html"): "audit_report_html",
    ("get", "/audits/{audit_id}/report.pdf"): "audit_report_pdf",
    ("get", "/models"): "list_models",
    ("post", "/models"): "upload_model",
    ("get", "/models/{model_id}"): "get_model",
    ("delete", "/models/{model_id}"): "delete_model",
    ("get", "/healthz"): "healthz",
    ("get", "/readyz"): "readyz",
    ("get", "/metrics"): "metrics",
    ("get", "/.well-known/cgidm-signing-keys.json"): "signing_keys",
}
BINARY = {"type": "string", "format": "binary"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict[str, Any]:
    """The document as the gateway serves it (the built-in registry, embedded storage and
    queue; no lifespan, nothing runs)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from cgidm.settings import Settings

    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("openapi")))
    return TestClient(app, client=("127.0.0.1", 50000)).get("/openapi.json").json()


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op for path, ops in spec["paths"].items()
            for method, op in ops.items()}


def _multipart_body(spec: dict[str, Any], path: str) -> dict[str, Any]:
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"][
        "schema"]
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema


def test_operations_are_named_by_their_route_functions(spec):
    named = {key: op["operationId"] for key, op in _operations(spec).items()}
    assert {key: named.get(key) for key in OPERATIONS} == OPERATIONS
    # routes added later get their function's name too: never FastAPI's default
    # (name + path + method), and no two operations share one
    for (method, path), name in named.items():
        assert name.isidentifier(), name
        assert not name.endswith(re.sub(r"\W", "_", path) + "_" + method), name
    assert len(set(named.values())) == len(named)


def test_the_check_form_is_one_flat_object_with_binary_file_arrays(spec):
    body = _multipart_body(spec, "/authenticate")
    assert "allOf" not in body and body["type"] == "object"
    assert set(body["properties"]) == {*JobSettings.model_fields, "images", "controls"}
    assert set(body["required"]) == {"pretrained", "finetuned", "images"}
    for field in ("images", "controls"):
        assert body["properties"][field]["type"] == "array"
        assert body["properties"][field]["items"] == BINARY
    # a form has no null: optional settings are plain types, bounds kept
    steps = body["properties"]["steps"]
    assert (steps["type"], steps["minimum"], steps["maximum"]) == ("integer", 1, 10_000)
    assert not any("anyOf" in field for field in body["properties"].values())
    upload = _multipart_body(spec, "/models")
    assert upload["properties"]["file"] == {**BINARY, "description": upload["properties"][
        "file"]["description"]}


def test_every_response_body_has_a_schema(spec):
    """A response without a schema is dropped by generators (the picture was, before)."""
    for (method, path), op in _operations(spec).items():
        for status, response in op["responses"].items():
            for media, content in response.get("content", {}).items():
                assert content.get("schema"), (method, path, status, media)
                if media in ("image/png", "application/pdf"):
                    assert content["schema"] == BINARY, (method, path, status, media)
