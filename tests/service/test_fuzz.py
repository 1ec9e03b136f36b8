"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis) against the gateway app.

Every operation gets a bounded number of generated requests (valid and invalid multipart
bodies, path ids, query strings); none may be answered with a 5xx. The route contract is the
point, so the app runs in-process (schemathesis calls it through ASGI, as FastAPI's TestClient
does), with its own embedded storage and queue, which no worker reads: accepted fuzz jobs never
run. Bodies that only a socket can produce (chunked, cut off) are in test_hostile_input.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from cgidm_testkit.processes import png_bytes

pytestmark = pytest.mark.slow  # hundreds of generated requests: ~20 s on 2 cores

EXAMPLES = 25  # per operation; the whole module stays well under a minute


def _from_loopback(app: Any) -> Any:
    """The app as a client on this machine reaches it: schemathesis' ASGI client names itself
    ``testclient``, which local mode (no keys) refuses with 403 before any route is reached.
    The lifespan already runs in the ``app_client`` around the app, so it is not run twice."""

    async def asgi(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await app({**scope, "client": ("127.0.0.1", 50000)}, receive, send)

    return asgi


def _operations(app: Any) -> list:
    loaded = schemathesis.openapi.from_asgi("/openapi.json", _from_loopback(app))
    return [result.ok() for result in loaded.get_all_operations()]


def _check(response, case) -> None:
    assert response.status_code < 500, (case.method, case.formatted_path, case.path_parameters,
                                        case.query, response.status_code, response.text[:500])
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 400 and content_type.startswith("application/json"):
        detail = response.json()["detail"]  # the documented error shape, whatever went wrong
        assert isinstance(detail, list) and detail and "msg" in detail[0], response.text


def _real_models(case):
    """Half the submissions name registered models, leave out the fields generated as null
    (a form has no null) and carry one real picture, so the fuzzing gets past the first
    refusals to the numbers, the prompt, the files and the storage of accepted jobs."""
    body = case.body
    if case.path == "/authenticate" and isinstance(body, dict) and len(str(body)) % 2 == 0:
        for key in [k for k, v in body.items() if v is None]:
            del body[key]
        body.update(pretrained="tiny-base", finetuned="tiny-ft")
        # negative generation may make ``images`` any JSON value: keep it only where it is a list
        images = body.get("images")
        body["images"] = [*(images[:2] if isinstance(images, list) else []),
                          png_bytes(len(body))]
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(app_client, mode):
    """Schemathesis' pytest plugin does not load under this pytest, so each operation's
    Hypothesis strategy is driven directly: the same generated requests."""
    operations = _operations(app_client.app)
    assert {op.path for op in operations} >= {"/authenticate", "/jobs/{job_id}",
                                              "/jobs/{job_id}/artifacts/{name}/{filename}"}
    unfuzzable: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode).map(_real_models))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            _check(case.call(), case)

        try:
            fuzz()
        except Unsatisfiable:  # nothing to get wrong in a route without inputs (/healthz...)
            unfuzzable.append(operation.path)
    assert "/authenticate" not in unfuzzable  # bounds, enums and types to break there
    # the generated submissions got past the refusals to stored jobs (a client that local mode
    # refused would have seen only 403s)
    assert app_client.app.state.services.store.storage.list_children("jobs/")
