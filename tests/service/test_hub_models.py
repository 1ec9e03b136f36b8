"""Suspects named by hub reference through the service: the gateway checks and queues, a real
Celery worker fetches from local stand-ins of Civitai and the Hugging Face Hub
(``cgidm_testkit.hub_servers``, HTTP on 127.0.0.1) into its disk cache and runs the job.

One stack of its own (gateway + worker, two API keys: alice may name models on both hosts, bob
on none) on the session's Redis and S3 server.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cgidm.client import CgidmClient, ServiceError
from cgidm_testkit import tinymodels
from cgidm_testkit.hub_servers import HubServer
from cgidm_testkit.processes import (
    png_bytes,
    stack_env,
    start_gateway,
    start_worker,
    stop_process,
    wait_for_job,
)

pytestmark = pytest.mark.slow  # starts servers and processes

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hub-models")


@pytest.fixture(scope="module")
def models(root, tiny_sd_pair) -> dict[str, Path]:
    base = tiny_sd_pair[0]  # the session's tiny SD base (tests/conftest.py)
    lora = tinymodels.make_lora(base, root / "lora", as_file=True, seed=1)
    # the same weights with other metadata: other bytes (fetched, cached and loaded on their
    # own) at the cost of a LoRA load, not of another fine-tune
    from safetensors.numpy import load_file, save_file

    copy = root / "hf" / "pytorch_lora_weights.safetensors"
    copy.parent.mkdir()
    save_file(load_file(str(lora)), str(copy), metadata={"source": "hub copy"})
    return {"base": base, "lora": lora, "hf_lora": copy}


@pytest.fixture(scope="module")
def hub(models) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_civitai_file(42, models["lora"], base_model="SD 1.5",
                                trained_words=["sks style"])
        server.add_civitai_file(43, models["lora"], published_sha256="00" * 32)
        server.add_civitai_file(44, models["lora"], token="needs-one")
        server.add_hf_repo("alice/sks-lora", {
            "pytorch_lora_weights.safetensors": models["hf_lora"].read_bytes()}, commit=COMMIT)
        yield server


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {name: secrets.token_urlsafe(24) for name in ("alice", "bob")}


@pytest.fixture(scope="module")
def env(root, models, keys, hub, redis_url, s3_endpoint) -> dict[str, str]:
    registry = root / "models.json"
    registry.write_text(json.dumps({"models": [
        {"id": "sd15", "family": "stable-diffusion", "path": str(models["base"])}]}))
    entries = ",".join(f"{n}:{hashlib.sha256(k.encode()).hexdigest()}" for n, k in keys.items())
    return stack_env(broker_url=redis_url, s3_endpoint=s3_endpoint, prefix="hubm",
                     registry=registry, data_dir=root / "data", extra={
                         "CGIDM_QUEUE": "hubm",
                         "CGIDM_API_KEYS": entries,
                         "CGIDM_MODEL_HOSTS": "alice=huggingface.co+civitai.com",
                         "CGIDM_CIVITAI_URL": hub.url,
                         "HF_ENDPOINT": hub.url,
                         "HF_HUB_OFFLINE": "0",  # the worker fetches (from 127.0.0.1 only)
                         "CGIDM_MODEL_CACHE_DIR": str(root / "cache"),
                         "CGIDM_CIVITAI_HASH_LOOKUP": "true",
                     })


@pytest.fixture(scope="module")
def stack(env, root) -> Iterator[str]:
    gateway, url = start_gateway(env, root / "gateway.log")
    worker = start_worker(env, root / "worker.log")
    yield url
    stop_process(worker)
    stop_process(gateway)


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def _submit(client: httpx.Client, finetuned: str, **fields: str) -> httpx.Response:
    return client.post("/authenticate", data={
        "pretrained": "sd15", "finetuned": finetuned, "steps": "1", "seed": "0", **fields},
        files=[("images", ("a.png", png_bytes(1, (16, 16)), "image/png"))])


def _run(client: httpx.Client, finetuned: str, **fields: str) -> dict:
    answer = _submit(client, finetuned, **fields)
    assert answer.status_code == 202, answer.text
    return wait_for_job(client, answer.json()["job_id"], timeout=180)


def test_civitai_and_hf_suspects_run_and_are_recorded(stack, keys, hub, models, root):
    with _client(stack, keys["alice"]) as alice:
        job = _run(alice, "https://civitai.com/models/1000?modelVersionId=42")
        assert job["status"] == "succeeded", job.get("error")
        result = job["result"]
        assert result["finetuned"] == "https://civitai.com/models/1000?modelVersionId=42"
        assert (result["prompt"], result["prompt_source"]) == ("sks style", "trained_words")
        hub_record = result["provenance"]["models"]["finetuned"]["hub"]
        sha = hashlib.sha256(models["lora"].read_bytes()).hexdigest()
        assert (hub_record["version_id"], hub_record["sha256"], hub_record["size"],
                hub_record["filename"]) == (42, sha, models["lora"].stat().st_size,
                                            models["lora"].name)
        assert hub_record["fetched_at"] and hub_record["reference"] == result["finetuned"]

        # the same model named another way, through the Python client (as `cgidm submit`)
        image = root / "a.png"
        image.write_bytes(png_bytes(1, (16, 16)))
        with CgidmClient(stack, keys["alice"]) as client:
            again = client.check("sd15", "civitai:42", [image], steps=1, seed=0)
        assert again["result"]["finetuned"] == "civitai:42"
        assert hub.downloads("/files/42/") == 1  # downloaded once, then the disk cache

        hf = _run(alice, "hf:alice/sks-lora", prompt="sks")
        assert hf["status"] == "succeeded", hf.get("error")
        assert hf["result"]["provenance"]["models"]["finetuned"]["hub"]["revision"] == COMMIT
        assert hub.downloads(f"/alice/sks-lora/resolve/{COMMIT}/") == 1  # by commit, once

        # pretrained "auto": the base the hub page records ("SD 1.5" -> sd15 in the table)
        auto = _run(alice, "civitai:42", pretrained="auto")
        assert auto["status"] == "succeeded", auto.get("error")
        assert auto["result"]["pretrained"] == "sd15"
        no_base = _run(alice, "hf:alice/sks-lora", pretrained="auto", prompt="sks")
        assert no_base["status"] == "failed" and no_base["error"]["code"] == "unknown_model"
        assert "does not record its base model" in no_base["error"]["message"]
    blobs = sorted(p.name for p in (root / "cache" / "blobs").iterdir())
    assert f"{sha}.safetensors" in blobs


def test_an_uploaded_file_is_looked_up_on_civitai_by_its_hash(stack, keys, models, hub):
    """CGIDM_CIVITAI_HASH_LOOKUP: the upload's sha256 is that of version 42 (and 43, 44)."""
    with _client(stack, keys["bob"]) as bob:
        upload = bob.post("/models", data={"finetuned_from": "sd15"},
                          files={"file": ("mine.safetensors", models["lora"].read_bytes())})
        assert upload.status_code == 201, upload.text
        job = _run(bob, upload.json()["id"], prompt="sks")
    assert job["status"] == "succeeded", job.get("error")
    found = job["result"]["provenance"]["models"]["finetuned"]["civitai"]
    assert found["found"] and found["version_id"] in (42, 43, 44)
    assert found["base_model"] and any("/by-hash/" in p for _, p, _ in hub.requests)


def test_wrong_hash_and_refused_token_fail_the_job_and_cache_nothing(stack, keys, root):
    with _client(stack, keys["alice"]) as alice:
        wrong = _run(alice, "civitai:43")
        assert wrong["status"] == "failed"
        assert wrong["error"]["code"] == "model_hash_mismatch", wrong["error"]
        denied = _run(alice, "civitai:44")
        assert denied["status"] == "failed"
        assert denied["error"]["code"] == "model_access_denied"
        assert "CGIDM_CIVITAI_TOKEN" in denied["error"]["message"]
    assert list((root / "cache" / "tmp").iterdir()) == []  # no .part left behind
    assert not (root / "cache" / "blobs" / f"{'00' * 32}.safetensors").exists()


def test_gateway_checks_references_and_hosts_without_fetching(stack, keys, hub):
    before = len(hub.requests)
    with _client(stack, keys["bob"]) as bob, _client(stack, keys["alice"]) as alice:
        refused = _submit(bob, "civitai:42")
        assert refused.status_code == 403
        assert refused.json()["detail"][0]["type"] == "remote_model_not_allowed"
        with CgidmClient(stack, keys["alice"]) as client, \
                pytest.raises(ServiceError, match="not a number") as err:
            client.submit("sd15", "civitai:abc", [__file__])  # refused before sending
        assert err.value.code == "invalid_model_reference"
        malformed = _submit(alice, "civitai:abc")
        assert malformed.status_code == 422
        assert malformed.json()["detail"][0]["type"] == "invalid_model_reference"
        no_base = _submit(alice, "civitai:42", pretrained="nope")
        assert no_base.status_code == 422 and no_base.json()["detail"][0]["loc"] == \
            ["body", "pretrained"]
    assert len(hub.requests) == before  # the gateway never talks to the hubs
