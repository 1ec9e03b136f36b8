"""API keys: who may see which job, signed artifact URLs, public routes, local mode.

The route rules (401 with a challenge, public routes) run in-process (FastAPI's TestClient).
A real gateway process is kept where it is the point: a key's own job and its signed picture
links need a real worker to make the pictures, and the gateway's log is checked for leaked keys;
local mode's refusal of a forwarded remote client depends on uvicorn trusting X-Forwarded-For
from 127.0.0.1; `cgidm keys new` and `cgidm serve` are the real commands.
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from cgidm.commands.keys import KEY_BYTES, entry
from cgidm.settings import Settings
from cgidm_testkit.processes import (
    child_env,
    png_bytes,
    start_gateway,
    stop_process,
    wait_for_job,
)
from tests.service.inprocess import gateway_in_process


def _new_key(name: str) -> tuple[str, str]:
    """(key, CGIDM_API_KEYS entry) from the real `cgidm keys new`."""
    out = subprocess.run([sys.executable, "-m", "cgidm.cli", "keys", "new", name],
                         env=child_env({}), capture_output=True, text=True, check=True)
    key = re.search(r"Bearer (\S+)", out.stdout).group(1)
    entry = re.search(rf"^  ({name}:[0-9a-f]{{64}})$", out.stdout, re.MULTILINE).group(1)
    return key, entry


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[str, str]]:
    """Keys made by the real command, for the tests that run a real gateway."""
    return {name: _new_key(name) for name in ("alice", "bob")}


@pytest.fixture(scope="module")
def keyed_app(tmp_path_factory, registry_file):
    """The gateway in-process with one key configured; requests come from 127.0.0.1."""
    key = secrets.token_urlsafe(KEY_BYTES)
    with gateway_in_process(tmp_path_factory.mktemp("keyed"), registry_file,
                            api_keys=entry("alice", key)) as http:
        yield http


@pytest.fixture(scope="module")
def keyed_url(service_env, service_root, keys):
    """A gateway with two keys, on the session's Redis queue and bucket (its worker runs jobs)."""
    env = {**service_env, "CGIDM_API_KEYS": ",".join(entry for _, entry in keys.values())}
    log = service_root / "gateway-keys.log"
    proc, url = start_gateway(env, log)
    yield url
    stop_process(proc)


def _client(url: str, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def _submit(client: Any, headers: dict[str, str] | None = None) -> Any:
    return client.post("/authenticate", headers=headers,
                       data={"pretrained": "tiny-base", "finetuned": "tiny-ft", "steps": "2"},
                       files=[("images", ("mine.png", png_bytes(31), "image/png"))])


@pytest.mark.slow  # runs the command twice
def test_cli_key_entry_is_the_sha256_of_the_key(keys):
    key, entry = keys["alice"]
    assert len(key) >= 40 and entry == f"alice:{hashlib.sha256(key.encode()).hexdigest()}"
    assert keys["bob"][0] != key


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic YWxpY2U6eA==", "Bearer"])
def test_missing_or_wrong_key_is_401_with_challenge(keyed_app, header):
    headers = {"Authorization": header} if header else {}
    responses = [keyed_app.get("/jobs/" + "0" * 32, headers=headers),
                 keyed_app.delete("/jobs/" + "0" * 32, headers=headers),
                 keyed_app.get("/models", headers=headers), _submit(keyed_app, headers),
                 keyed_app.get(f"/jobs/{'0' * 32}/artifacts/a/recovered.png",
                               headers=headers)]
    for response in responses:
        assert response.status_code == 401, (response.request.url, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["detail"][0]["loc"] == ["header", "authorization"]


def test_public_routes_need_no_key(keyed_app):
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert keyed_app.get(path).status_code == 200, path


@pytest.mark.slow  # a real worker makes the pictures; the real gateway's log is read
def test_a_key_sees_only_its_own_jobs_and_pictures(worker, keyed_url, keys, service_root):
    alice, bob, anonymous = (_client(keyed_url, keys["alice"][0]),
                             _client(keyed_url, keys["bob"][0]), _client(keyed_url))
    with alice, bob, anonymous:
        assert alice.get("/models").status_code == 200
        accepted = _submit(alice)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        job = wait_for_job(alice, job_id)
        assert job["status"] == "succeeded" and job["owner"] == "alice"

        # bob: every route answers as if the job did not exist
        missing = bob.get("/jobs/" + "f" * 32)
        for response in (bob.get(f"/jobs/{job_id}"), bob.delete(f"/jobs/{job_id}")):
            assert response.status_code == 404
            assert response.json()["detail"][0]["type"] == missing.json()["detail"][0]["type"]
        links = job["result"]["images"][0]["artifacts"]
        path = links["recovered"].split("?")[0]
        assert bob.get(path).status_code == 404
        assert bob.get(links["recovered"]).status_code == 404  # his key, her link: still hers

        # alice's key opens the plain path; the signed link opens without any key
        assert alice.get(path).status_code == 200
        picture = anonymous.get(links["side_by_side"])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        Image.open(io.BytesIO(picture.content)).verify()
        assert re.search(r"\?expires=\d+&signature=[\w-]{43}$", links["partial"])

        # a link is for one picture, and only until it expires
        assert anonymous.get(path).status_code == 401
        tampered = links["recovered"][:-2] + ("AA" if not links["recovered"].endswith("AA")
                                              else "BB")
        assert anonymous.get(tampered).status_code == 401
        other_picture = links["partial"].replace("partial.png", "recovered.png")
        assert anonymous.get(other_picture).status_code == 401
        later = re.sub(r"expires=(\d+)", lambda m: f"expires={int(m.group(1)) + 3600}",
                       links["recovered"])
        assert anonymous.get(later).status_code == 401
        from app.auth import UrlSigner

        settings = Settings(api_keys=",".join(entry for _, entry in keys.values()))
        expired = UrlSigner(settings).sign(path, "alice", now=time.time() - 7200)
        assert anonymous.get(expired).status_code == 401
        fresh = UrlSigner(settings).sign(path, "alice")
        assert anonymous.get(fresh).status_code == 200  # the same signer, not expired: works

    log = (service_root / "gateway-keys.log").read_text()
    assert keys["alice"][0] not in log and keys["bob"][0] not in log
    signature = links["recovered"].rsplit("signature=", 1)[1]
    assert signature not in log and "signature=[redacted]" in log


@pytest.mark.slow  # uvicorn's trust of X-Forwarded-For is the point
def test_local_mode_refuses_clients_from_other_machines(client):
    """No keys configured: only loopback clients. A proxy on this machine forwarding a remote
    client (X-Forwarded-For, trusted from 127.0.0.1 by uvicorn) does not open it up."""
    assert client.get("/models").status_code == 200
    remote = client.get("/models", headers={"X-Forwarded-For": "203.0.113.9"})
    assert remote.status_code == 403 and remote.json()["detail"][0]["type"] == "local_mode"
    assert client.get("/healthz", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 200


@pytest.mark.slow  # the real command
def test_serve_refuses_a_public_address_without_keys(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cgidm.cli", "serve", "--host", "0.0.0.0", "--data-dir",
         str(tmp_path)], env=child_env({}), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in out.stderr


@pytest.mark.parametrize("value", ["alice", "alice:not-a-hash", "al ice:" + "0" * 64,
                                   "a:" + "0" * 64 + ",a:" + "1" * 64])
def test_malformed_key_settings_are_refused(value):
    with pytest.raises(ValidationError, match="CGIDM_API_KEYS"):
        Settings(api_keys=value)
