"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis) against the real gateway.

Every operation gets a bounded number of generated requests (valid and invalid multipart
bodies, path ids, query strings); none may be answered with a 5xx. The gateway has its own
queue, which no worker reads, and its own storage prefix, so accepted fuzz jobs never run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from tests.service.procs import BUCKET, png_bytes, start_gateway, stop_process

pytestmark = pytest.mark.slow  # starts servers and processes

EXAMPLES = 25  # per operation; the whole module stays well under a minute


@pytest.fixture(scope="module")
def fuzz_url(service_env, service_root) -> Iterator[str]:
    env = {**service_env, "CGIDM_QUEUE": "fuzz", "CGIDM_STORAGE_URL": f"s3://{BUCKET}/fuzz"}
    proc, url = start_gateway(env, service_root / "gateway-fuzz.log")
    yield url
    stop_process(proc)


def _operations(url: str) -> list:
    loaded = schemathesis.openapi.from_url(f"{url}/openapi.json")
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
        body["images"] = [*(body.get("images") or [])[:2], png_bytes(len(body))]
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(fuzz_url, mode):
    """Schemathesis' pytest plugin does not load under this pytest, so each operation's
    Hypothesis strategy is driven directly: the same generated requests."""
    operations = _operations(fuzz_url)
    assert {op.path for op in operations} >= {"/authenticate", "/jobs/{job_id}",
                                              "/jobs/{job_id}/artifacts/{name}/{filename}"}
    unfuzzable: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode).map(_real_models))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            _check(case.call(base_url=fuzz_url, timeout=30), case)

        try:
            fuzz()
        except Unsatisfiable:  # nothing to get wrong in a route without inputs (/healthz...)
            unfuzzable.append(operation.path)
    assert "/authenticate" not in unfuzzable  # bounds, enums and types to break there
