"""The HTTP contract as client generators read it (app/openapi.py).

The quick tests read the document of the in-process gateway: operations named by their route
functions, multipart bodies flat with binary file arrays, and a schema for every response that
is not JSON. The slow test is the user's path: openapi-python-client generates a client from the
live gateway's /openapi.json (over real HTTP, into a temporary folder; never committed), and a
check runs through that client with files, polled to its result, pictures downloaded.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any

import pytest

from cgidm.jobs import JobSettings
from cgidm_testkit.generated_client import generated_client, submodule, wait_for_job
from cgidm_testkit.processes import png_bytes

#: What a generated client calls each operation; renaming one breaks every client made before.
OPERATIONS = {
    ("post", "/authenticate"): "authenticate",
    ("get", "/jobs"): "list_jobs",
    ("get", "/jobs/{job_id}"): "get_job",
    ("delete", "/jobs/{job_id}"): "cancel_job",
    ("get", "/jobs/{job_id}/artifacts/{name}/{filename}"): "get_artifact",
    ("get", "/jobs/{job_id}/report.html"): "evidence_report",
    ("get", "/jobs/{job_id}/report.pdf"): "evidence_report_pdf",
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


# ------------------------------------------------------------------------------------------
# a client generated from the live spec (with keys and the demo pair: test_web_browser.py)


@pytest.mark.slow
def test_a_generated_client_runs_a_check_with_files(worker, gateway_url, tmp_path):
    with generated_client(gateway_url, tmp_path) as package:
        models, types = submodule(package, "models"), submodule(package, "types")
        authenticate = submodule(package, "api.jobs.authenticate")
        get_artifact = submodule(package, "api.jobs.get_artifact")
        client = package.Client(base_url=gateway_url, raise_on_unexpected_status=True,
                                timeout=30)

        def picture(name: str, seed: int) -> Any:
            return types.File(payload=BytesIO(png_bytes(seed)), file_name=name,
                              mime_type="image/png")

        # a refusal comes back as the documented error body, naming the field
        refused = authenticate.sync_detailed(client=client, body=models.BodyAuthenticate(
            pretrained="tiny-base", finetuned="no-such-model", images=[picture("a.png", 1)]))
        assert refused.status_code == 422 and isinstance(refused.parsed, models.ErrorBody)
        assert refused.parsed.detail[0].type_ == "unknown_model"

        accepted = authenticate.sync(client=client, body=models.BodyAuthenticate(
            pretrained="tiny-base", finetuned="tiny-ft", steps=4, seed=3,
            images=[picture("mine.png", 1)], controls=[picture("control.png", 5)]))
        assert isinstance(accepted, models.JobAccepted), accepted
        job = wait_for_job(package, client, accepted.job_id)
        assert job.status.value == "succeeded", job.to_dict()
        assert [item.name for item in job.result.images] == ["mine"]
        assert [item.name for item in job.result.controls] == ["control"]
        assert 0 < job.result.images[0].p_value <= 1

        recovered = get_artifact.sync(accepted.job_id, "mine", "recovered.png", client=client)
        assert isinstance(recovered, types.File)
        assert recovered.payload.read().startswith(b"\x89PNG\r\n\x1a\n")
