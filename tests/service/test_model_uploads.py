"""Bring-your-own-model: uploads through the real gateway, jobs on them in a real worker.

One stack of its own (gateway + Celery worker, two API keys) on the session's Redis and S3
server, with its own queue and storage prefix. The suspect models are built here: a tiny Stable
Diffusion base with LoRA fine-tunes (diffusers' own ``save_lora_weights``), the UNet weights
of a tiny DDPM fine-tune, and a tiny base with a LoRA or single file of each flow family that
takes uploads (Chroma, Flux.2 Klein, SD 3.5, Z-Image, Qwen-Image: ``FLOW_UPLOADS``). The model
size limit is 8 MiB instead of the 8 GiB default (a test cannot stream gigabytes);
``benchmarks/upload.py`` streams 2 GB through the same code.

The refusals stay on the real gateway and S3 server too, although they are route contracts:
uploads stream into S3 multipart uploads, and each refusal is checked to leave no blob and no
unfinished multipart upload on the real server.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cgidm_testkit import tinymodels
from cgidm_testkit.processes import (
    BUCKET,
    bucket_keys,
    png_bytes,
    s3_client,
    send_unfinished_chunked,
    stack_env,
    start_gateway,
    start_worker,
    stop_process,
    wait_for_job,
)

pytestmark = pytest.mark.slow  # starts servers and processes

PREFIX = "byom"
MAX_MODEL = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def byom_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("byom")


@pytest.fixture(scope="module")
def models(byom_root) -> dict[str, Path]:
    """A tiny SD base and three LoRA files for it; a tiny DDPM pair (its fine-tuned UNet
    weights are uploaded as a bare file)."""
    base = tinymodels.make_tiny_sd(byom_root / "sd-base", seed=0)
    out = {"sd-base": base}
    for seed in (1, 2, 3):
        out[f"lora{seed}"] = tinymodels.make_lora(base, byom_root / f"lora{seed}", as_file=True,
                                                  seed=seed)
    pre, ft = tinymodels.make_tiny_ddpm_pair(byom_root / "ddpm", seed=0)
    out["ddpm-base"], out["ddpm-ft"] = pre, ft
    return out


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {name: secrets.token_urlsafe(24) for name in ("alice", "bob")}


@pytest.fixture(scope="module")
def byom_env(byom_root, models, keys, redis_url, s3_endpoint) -> dict[str, str]:
    registry = byom_root / "models.json"
    registry.write_text(json.dumps({"models": [
        {"id": "sd-base", "family": "stable-diffusion", "path": str(models["sd-base"])},
        {"id": "ddpm-base", "family": "ddpm", "path": str(models["ddpm-base"])},
    ]}))
    lora_bytes = models["lora1"].stat().st_size
    entries = ",".join(f"{n}:{hashlib.sha256(k.encode()).hexdigest()}" for n, k in keys.items())
    return stack_env(broker_url=redis_url, s3_endpoint=s3_endpoint, prefix=PREFIX,
                     registry=registry, data_dir=byom_root / "data", extra={
                         "CGIDM_QUEUE": "byom",
                         "CGIDM_API_KEYS": entries,
                         "CGIDM_MAX_MODEL_BYTES": str(MAX_MODEL),
                         "CGIDM_MODEL_CACHE_DIR": str(byom_root / "cache"),
                         # room for two LoRA files but not three: the third evicts one
                         "CGIDM_MODEL_DISK_BYTES": str(int(lora_bytes * 2.5)),
                         # one pair in memory at a time, so each switch loads from disk again
                         "CGIDM_MODEL_CACHE_BYTES": "1",
                     })


@pytest.fixture(scope="module")
def byom_url(byom_env, byom_root) -> Iterator[str]:
    proc, url = start_gateway(byom_env, byom_root / "gateway.log")
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def byom_worker(byom_env, byom_root) -> Iterator[None]:
    proc = start_worker(byom_env, byom_root / "worker.log")
    yield
    stop_process(proc)


@pytest.fixture(scope="module")
def alice(byom_url, keys) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=byom_url, timeout=60,
                      headers={"Authorization": f"Bearer {keys['alice']}"}) as client:
        yield client


@pytest.fixture(scope="module")
def bob(byom_url, keys) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=byom_url, timeout=60,
                      headers={"Authorization": f"Bearer {keys['bob']}"}) as client:
        yield client


def upload(client: httpx.Client, data: bytes, filename: str = "suspect.safetensors",
           **fields: str) -> httpx.Response:
    fields = {"finetuned_from": "sd-base", **fields}
    return client.post("/models", data=fields, files={"file": (filename, data)})


def run_job(client: httpx.Client, finetuned: str, pretrained: str = "sd-base",
            seed: int = 1) -> dict:
    response = client.post("/authenticate", data={
        "pretrained": pretrained, "finetuned": finetuned, "steps": "2", "seed": "0"},
        files=[("images", (f"img{seed}.png", png_bytes(seed, (20, 20)), "image/png"))])
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"], timeout=180)


def stored(s3_endpoint: str, owner: str, what: str) -> list[str]:
    return bucket_keys(s3_endpoint, f"{PREFIX}/models/k-{owner}/{what}/")


def pending_multipart(s3_endpoint: str) -> list[str]:
    answer = s3_client(s3_endpoint).list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX)
    return [u["Key"] for u in answer.get("Uploads", [])]


def worker_disk_stats(s3_endpoint: str) -> dict[str, int]:
    keys = bucket_keys(s3_endpoint, f"{PREFIX}/workers/")
    assert len(keys) == 1, keys
    body = s3_client(s3_endpoint).get_object(Bucket=BUCKET, Key=keys[0])["Body"].read()
    return json.loads(body)["disk_cache"]


# ------------------------------------------------------------------------------------------


def test_uploaded_lora_is_checked_by_the_worker(byom_worker, alice, models, s3_endpoint):
    data = models["lora1"].read_bytes()
    response = upload(alice, data, prompt="sks style")
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["sha256"] == hashlib.sha256(data).hexdigest()
    assert model["kind"] == "lora" and model["family"] == "stable-diffusion"
    assert model["finetuned_from"] == "sd-base" and model["size_bytes"] == len(data)
    assert model["prompt"] == "sks style" and model["prompt_source"] == "upload"
    assert response.headers["location"] == f"/models/{model['id']}"
    blobs = stored(s3_endpoint, "alice", "blobs")
    assert len(blobs) == 1
    assert s3_client(s3_endpoint).get_object(Bucket=BUCKET, Key=blobs[0])["Body"].read() == data

    again = upload(alice, data, filename="renamed.safetensors")  # same bytes: same model
    assert again.status_code == 200 and again.json()["id"] == model["id"]
    assert stored(s3_endpoint, "alice", "blobs") == blobs

    listed = {m["id"]: m for m in alice.get("/models").json()["models"]}
    assert {"sd-base", "ddpm-base", model["id"]} == set(listed)
    assert listed[model["id"]]["uploaded"] is True and listed["sd-base"]["uploaded"] is False

    job = run_job(alice, model["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["finetuned"] == model["id"] and result["pair"]["family"] == "stable-diffusion"
    assert result["pair"]["lora_unet_layers"] > 0
    assert isinstance(result["images"][0]["score"], float)
    assert alice.get(result["images"][0]["artifacts"]["side_by_side"]).status_code == 200


def test_a_file_changed_in_storage_fails_its_job_clearly(byom_worker, bob, models,
                                                       s3_endpoint):
    data = models["lora3"].read_bytes()
    model = upload(bob, data, prompt="sks style").json()
    [blob] = stored(s3_endpoint, "bob", "blobs")
    changed = bytearray(data)
    changed[-1] ^= 0xFF  # same size, valid header: only the hash can tell
    s3_client(s3_endpoint).put_object(Bucket=BUCKET, Key=blob, Body=bytes(changed))
    job = run_job(bob, model["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "model_format", job
    assert model["sha256"] in job["error"]["message"] and "upload it again" in \
        job["error"]["message"]
    assert bob.delete(f"/models/{model['id']}").status_code == 204
    assert stored(s3_endpoint, "bob", "blobs") == []


def test_uploaded_unet_weights_of_a_ddpm_fine_tune(byom_worker, alice, models, tmp_path,
                                                   capsys):
    weights = next((models["ddpm-ft"] / "unet").glob("*.safetensors")).read_bytes()
    refused = upload(alice, weights)  # a pixel UNet is not a Stable Diffusion fine-tune
    assert refused.json()["detail"][0]["type"] == "family_mismatch"
    response = upload(alice, weights, finetuned_from="ddpm-base", kind="unet")
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == "unet" and response.json()["family"] == "ddpm"
    job = run_job(alice, response.json()["id"], pretrained="ddpm-base")
    assert job["status"] == "succeeded", job
    assert job["result"]["pair"]["family"] == "ddpm"
    finetuned = job["result"]["provenance"]["models"]["finetuned"]
    assert finetuned["kind"] == "unet" and finetuned["sha256"] == hashlib.sha256(
        weights).hexdigest()

    # A third party re-runs the result from the bare file it downloaded (library kind "unet",
    # the loader the worker used), and a changed file is refused before anything runs.
    from cgidm.cli import main

    record = tmp_path / "job.json"
    record.write_text(json.dumps(job))
    images = tmp_path / "images"
    images.mkdir()
    (images / "img1.png").write_bytes(png_bytes(1, (20, 20)))  # the bytes the job was sent
    suspect = tmp_path / "downloaded.safetensors"
    suspect.write_bytes(weights)
    verify = ["verify", str(record), "--images", str(images), "--pretrained",
              str(models["ddpm-base"]), "--finetuned", str(suspect)]
    capsys.readouterr()
    assert main(verify) == 0
    printed = capsys.readouterr().out
    assert "every model file match the record" in printed
    assert "VERIFIED on cpu/float32" in printed and "img1" in printed
    changed = bytearray(weights)
    changed[-1] ^= 0x01  # one bit of one weight: same size, valid header
    suspect.write_bytes(bytes(changed))
    assert main(verify) == 2
    printed = capsys.readouterr().out
    assert "REFUSED" in printed and "finetuned model differs from the record" in printed


def test_two_keys_never_see_each_others_uploads(byom_worker, alice, bob, models, s3_endpoint):
    data = models["lora2"].read_bytes()
    mine = upload(alice, data, prompt="sks style").json()["id"]
    assert bob.get(f"/models/{mine}").status_code == 404
    assert bob.delete(f"/models/{mine}").status_code == 404
    assert mine not in {m["id"] for m in bob.get("/models").json()["models"]}
    refused = bob.post("/authenticate", data={"pretrained": "sd-base", "finetuned": mine},
                       files=[("images", ("a.png", png_bytes(1), "image/png"))])
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["type"] == "unknown_model"
    theirs = upload(bob, data).json()  # the same file: bob's own, unrelated id
    assert theirs["id"] != mine and theirs["sha256"] == hashlib.sha256(data).hexdigest()
    assert alice.get(f"/models/{theirs['id']}").status_code == 404

    job = run_job(alice, mine, seed=2)
    assert job["status"] == "succeeded", job
    assert bob.delete(f"/models/{theirs['id']}").status_code == 204
    assert alice.get(f"/models/{mine}").status_code == 200  # bob's delete touched only his
    assert alice.delete(f"/models/{mine}").status_code == 204
    assert alice.get(f"/models/{mine}").status_code == 404
    assert alice.get(f"/jobs/{job['job_id']}").json()["status"] == "succeeded"  # record kept
    assert alice.delete("/models/sd-base").status_code == 403
    gone = alice.post("/authenticate", data={"pretrained": "sd-base", "finetuned": mine},
                      files=[("images", ("a.png", png_bytes(1), "image/png"))])
    assert gone.status_code == 422
    blobs = {k.rsplit("/", 1)[-1] for k in stored(s3_endpoint, "alice", "blobs")}
    assert len(blobs) == 2  # lora1 and the DDPM UNet remain; lora2's file is gone
    assert stored(s3_endpoint, "bob", "blobs") == []


def _raw_upload(url: str, key: str, chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """A chunked multipart POST /models that never ends by itself: (answer, bytes sent)."""
    host = url.removeprefix("http://").split(":")[0]
    head = (f"POST /models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=BOUNDARY\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    return send_unfinished_chunked(url, head, chunks, until=b"}]}")


def _header(tensors: dict[str, tuple[str, list[int]]]) -> tuple[bytes, int]:
    """A valid safetensors header for these tensors, and the data size it announces."""
    entries, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = 4 * math.prod(shape)
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw, offset


LORA_NAMES = {"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": ("F32", [4, 16]),
              "unet.down_blocks.0.attentions.0.to_q.lora_B.weight": ("F32", [16, 4])}


def test_oversize_upload_is_refused_while_streaming_and_leaves_nothing(byom_url, keys,
                                                                       s3_endpoint):
    header, data_bytes = _header(LORA_NAMES)  # a small, honest header, then far more bytes

    def body() -> Iterator[bytes]:
        yield (b"--BOUNDARY\r\nContent-Disposition: form-data; name=\"finetuned_from\"\r\n\r\n"
               b"sd-base\r\n--BOUNDARY\r\nContent-Disposition: form-data; name=\"file\"; "
               b"filename=\"big.safetensors\"\r\n\r\n" + header)
        for _ in range(64 * 1024 * 1024 // 65536):  # 64 MiB, 8x the limit
            yield bytes(65536)

    answer, sent = _raw_upload(byom_url, keys["alice"], body())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"file_too_large" in answer and b"CGIDM_MAX_MODEL_BYTES" in answer
    assert sent < 3 * MAX_MODEL, f"the gateway read {sent} bytes before refusing"

    big = {"unet.x.lora_A.weight": ("F32", [1024, 1024, 4])}  # the header announces 16 MiB
    header, _ = _header(big)
    answer, sent = _raw_upload(byom_url, keys["alice"], iter([
        b"--BOUNDARY\r\nContent-Disposition: form-data; name=\"finetuned_from\"\r\n\r\n"
        b"sd-base\r\n--BOUNDARY\r\nContent-Disposition: form-data; name=\"file\"; "
        b"filename=\"big.safetensors\"\r\n\r\n" + header, *[bytes(65536)] * 16]))
    assert answer.startswith(b"HTTP/1.1 413") and b"its header describes" in answer
    host = byom_url.removeprefix("http://")
    with socket.create_connection(tuple(host.split(":")), timeout=10) as sock:  # type: ignore
        sock.sendall(f"POST /models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                     f"{keys['alice']}\r\nContent-Length: {10 * MAX_MODEL}\r\nContent-Type: "
                     "multipart/form-data; boundary=B\r\n\r\nxxxx".encode())
        answer = b""  # at once: a declared size over the limit is not read at all
        while b"}]}" not in answer and (more := sock.recv(65536)):
            answer += more
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
    assert stored(s3_endpoint, "bob", "blobs") == []
    assert pending_multipart(s3_endpoint) == []
    assert all("big" not in k for k in bucket_keys(s3_endpoint, f"{PREFIX}/models/"))


@pytest.mark.parametrize("name, content, status, kind", [
    ("model.ckpt", b"\x80\x04\x95" + bytes(100), 415, "pickle_checkpoint"),
    ("model.bin", b"PK\x03\x04" + bytes(100), 415, "pickle_checkpoint"),
    ("model.safetensors", b"\x80\x04\x95" + bytes(100), 415, "pickle_checkpoint"),
    ("model.safetensors", b"PK\x03\x04" + bytes(100), 415, "pickle_checkpoint"),
    ("model.safetensors", struct.pack("<Q", 10**12) + b"{}", 422, "corrupt_safetensors"),
    ("model.safetensors", struct.pack("<Q", 12) + b"{not json!!}", 422, "corrupt_safetensors"),
    ("model.safetensors", b"\x05\x00", 422, "corrupt_safetensors"),
    ("model.safetensors", b"", 422, "corrupt_safetensors"),
])
def test_pickle_and_corrupt_files_are_refused(bob, s3_endpoint, name, content, status, kind):
    response = upload(bob, content, filename=name)
    assert response.status_code == status, response.text
    assert response.json()["detail"][0]["type"] == kind
    assert stored(s3_endpoint, "bob", "blobs") == [] and pending_multipart(s3_endpoint) == []


def test_headers_that_lie_or_do_not_fit_are_refused(bob, s3_endpoint):
    header, size = _header(LORA_NAMES)
    truncated = upload(bob, header + bytes(size - 1))
    assert truncated.status_code == 422 and "truncated" in truncated.text
    raw = json.dumps({"a.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
                      "a.lora_B.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})
    overlap = upload(bob, struct.pack("<Q", len(raw)) + raw.encode() + bytes(12))
    assert overlap.status_code == 422 and "data_offsets" in overlap.text
    raw = json.dumps({"a.lora_A.weight": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}})
    dtype = upload(bob, struct.pack("<Q", len(raw)) + raw.encode() + bytes(4))
    assert dtype.status_code == 422 and "unknown dtype" in dtype.text
    sdxl, size = _header({"lora_te2_text_model.x.lora_down.weight": ("F32", [2, 2])})
    refused = upload(bob, sdxl + bytes(size))  # an SDXL LoRA for an SD 1.x base
    assert refused.status_code == 422 and refused.json()["detail"][0]["type"] == \
        "family_mismatch"
    unet, size = _header({"conv_in.weight": ("F32", [2]), "down_blocks.0.w": ("F32", [2]),
                          "time_embedding.linear_1.weight": ("F32", [2])})
    wrong_kind = upload(bob, unet + bytes(size), kind="lora")
    assert wrong_kind.status_code == 422 and wrong_kind.json()["detail"][0]["type"] == \
        "kind_mismatch"
    lora, size = _header(LORA_NAMES)
    assert upload(bob, lora + bytes(size), finetuned_from="nope").status_code == 422
    assert upload(bob, lora + bytes(size), finetuned_from="../x").status_code == 422
    bad_prompt = upload(bob, lora + bytes(size), prompt="sks\x01style")
    assert bad_prompt.status_code == 422 and bad_prompt.json()["detail"][0]["type"] == \
        "invalid_prompt"
    unknown = bob.post("/models", data={"finetuned_from": "sd-base", "colour": "red"},
                       files={"file": ("a.safetensors", lora + bytes(size))})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == \
        ["body", "colour"]
    no_auth = httpx.post(f"{bob.base_url}/models", files={"file": ("a.safetensors", lora)})
    assert no_auth.status_code == 401
    assert stored(s3_endpoint, "bob", "blobs") == [] and pending_multipart(s3_endpoint) == []


def test_disk_cache_detects_tampering_and_evicts_least_recently_used(
        byom_worker, alice, models, byom_root, s3_endpoint):
    """Memory holds one pair (CGIDM_MODEL_CACHE_BYTES=1), the disk two LoRA files."""
    ids = {}
    for n in (1, 2, 3):
        response = upload(alice, models[f"lora{n}"].read_bytes(), prompt="sks style")
        assert response.status_code in (200, 201), response.text
        ids[n] = response.json()
    blobs = byom_root / "cache" / "blobs"

    def cached() -> set[str]:
        return {p.name.removesuffix(".safetensors") for p in blobs.glob("*.safetensors")}

    assert run_job(alice, ids[1]["id"])["status"] == "succeeded"
    assert run_job(alice, ids[2]["id"])["status"] == "succeeded"
    assert {ids[1]["sha256"], ids[2]["sha256"]} <= cached()
    before = worker_disk_stats(s3_endpoint)

    victim = blobs / f"{ids[1]['sha256']}.safetensors"  # someone changes a cached file
    tampered = bytearray(victim.read_bytes())
    tampered[-1] ^= 0xFF
    victim.write_bytes(bytes(tampered))
    job = run_job(alice, ids[1]["id"])
    assert job["status"] == "succeeded", job
    after = worker_disk_stats(s3_endpoint)
    assert after["corrupt"] == before["corrupt"] + 1
    assert after["downloads"] == before["downloads"] + 1
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == ids[1]["sha256"]  # fetched again

    job = run_job(alice, ids[3]["id"])  # no room for three: lora2 (least recently used) goes
    assert job["status"] == "succeeded", job
    assert cached() == {ids[1]["sha256"], ids[3]["sha256"]}
    final = worker_disk_stats(s3_endpoint)
    assert final["evictions"] >= after["evictions"] + 1
    assert final["bytes"] <= int(models["lora1"].stat().st_size * 2.5)
    assert not list((byom_root / "cache" / "tmp").iterdir())  # no half-written file left


def test_client_says_what_went_wrong(byom_url, byom_env, byom_root, keys, models):
    """The Python client (and so `cgidm submit`) against the real gateway: 401, 404 and 413
    are one readable line; a full queue is retried after Retry-After, then reported."""
    from cgidm.client import CgidmClient, ServiceError

    with CgidmClient(byom_url, key="not-a-key") as wrong, pytest.raises(ServiceError) as err:
        wrong.models()
    assert err.value.status == 401 and "API key" in str(err.value)
    with CgidmClient(byom_url, key=keys["alice"]) as service:
        with pytest.raises(ServiceError) as err:
            service.delete_model("up-" + "0" * 24)
        assert err.value.status == 404
        header, _ = _header({"unet.x.lora_A.weight": ("F32", [3 * 1024 * 1024])})  # 12 MiB
        big = byom_root / "big.safetensors"
        with big.open("wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + 12 * 1024 * 1024)  # sparse
        with pytest.raises(ServiceError) as err:
            service.upload_model(big, "sd-base")
        assert err.value.status == 413 and "CGIDM_MAX_MODEL_BYTES" in str(err.value)

    # a gateway whose queue nobody reads, with room for one job
    env = {**byom_env, "CGIDM_QUEUE": "byom-full", "CGIDM_MAX_QUEUE_DEPTH": "1",
           "CGIDM_QUEUE_RETRY_AFTER": "7"}
    proc, url = start_gateway(env, byom_root / "gateway-full.log")
    waits: list[float] = []
    try:
        with CgidmClient(url, key=keys["alice"], busy_retries=2, sleep=waits.append) as full:
            image = byom_root / "one.png"
            image.write_bytes(png_bytes(5))
            full.submit("sd-base", "sd-base", [image])  # takes the only place
            with pytest.raises(ServiceError) as err:
                full.submit("sd-base", "sd-base", [image])
    finally:
        stop_process(proc)
    assert waits == [7.0, 7.0]  # retried twice, each after the service's Retry-After
    assert err.value.status == 429 and "queue_full" in str(err.value)


# -- a flow-family upload of each family that takes uploads, checked with controls through the
# worker

#: family -> (registry id of its tiny base, its testkit base maker, the upload's maker and kind,
#: the registered base of ANOTHER family it is refused against). The kinds alternate between a
#: LoRA and a single file, and the namings between diffusers', ComfyUI's and Stability's, so
#: that each adapter's upload path runs once in the worker: peft LoRAs attached through the
#: family's diffusers loader (Chroma through Flux.1's, Flux.2 Klein through Flux.2's, Z-Image's
#: ComfyUI names through its converter) and single files converted by diffusers' single-file
#: converters (SD 3.5's Stability naming, Qwen-Image's ``model.diffusion_model.``).
FLOW_UPLOADS = {
    "chroma": ("chroma-base", "make_tiny_chroma", "lora", "sd-base"),
    "flux2": ("flux2-base", "make_tiny_flux2_klein", "lora", "zimage-base"),
    "sd3": ("sd3-base", "make_tiny_sd3", "single_file", "flux2-base"),
    "z-image": ("zimage-base", "make_tiny_zimage", "lora", "sd3-base"),
    "qwen-image": ("qwen-base", "make_tiny_qwen_image", "single_file", "zimage-base"),
}


def _flow_upload(family: str, base: Path, out: Path) -> Path:
    """The file a user of ``family`` uploads, as its trainers write it."""
    from cgidm_testkit import tiny_families as tk

    files = {
        "chroma": lambda: tk.make_chroma_lora(base, out, seed=1)
        / "pytorch_lora_weights.safetensors",
        "flux2": lambda: tk.make_flux2_lora(base, out, seed=1)
        / "pytorch_lora_weights.safetensors",
        "sd3": lambda: tk.make_sd3_single_file(base, out / "sd35_ft.safetensors", seed=1),
        "z-image": lambda: tk.make_zimage_lora(base, out / "zimage_lora.safetensors", seed=1,
                                               naming="comfy"),
        "qwen-image": lambda: tk.make_qwen_image_single_file(base, out / "qwen_ft.safetensors",
                                                             seed=1),
    }
    return files[family]()


@pytest.fixture(scope="module")
def flow_models(byom_root) -> dict[str, Path]:
    """A tiny base of each flow family that takes uploads, all registered at once (the gateway
    and the worker re-read the registry file when it changes), and the file uploaded for it."""
    from cgidm_testkit import tiny_families

    registry = byom_root / "models.json"
    document = json.loads(registry.read_text())
    uploads = {}
    for family, (base_id, make_base, _, _) in FLOW_UPLOADS.items():
        base = getattr(tiny_families, make_base)(byom_root / base_id, seed=0)
        uploads[family] = _flow_upload(family, base, byom_root / f"{family}-upload")
        document["models"].append({"id": base_id, "family": family, "path": str(base)})
    registry.write_text(json.dumps(document))
    return uploads


@pytest.mark.parametrize("family", list(FLOW_UPLOADS))
def test_a_flow_family_upload_with_controls(byom_worker, alice, flow_models, family):
    """A LoRA or single file of each flow family that takes uploads: refused against a base of
    another family (422 family_mismatch), taken for its own base, then checked by the real
    worker with controls: verdicts, a set-level test and the evidence pictures."""
    base_id, _, kind, other = FLOW_UPLOADS[family]
    data = flow_models[family].read_bytes()
    refused = upload(alice, data, finetuned_from=other)
    assert refused.status_code == 422 and refused.json()["detail"][0]["type"] == \
        "family_mismatch", refused.text
    response = upload(alice, data, finetuned_from=base_id, prompt="sks style")
    assert response.status_code == 201, response.text
    model = response.json()
    assert (model["kind"], model["family"]) == (kind, family)
    # 32 px: the tiny models' size (Qwen-Image's pair would run at its native 1024 px); the
    # base-model recovery (on by default, about half a job's time) only for Chroma
    submitted = alice.post("/authenticate", data={
        "pretrained": base_id, "finetuned": model["id"], "steps": "2", "seed": "0",
        "resolution": "32", "base_recovery": str(family == "chroma").lower()},
        files=[*(("images", (f"i{k}.png", png_bytes(k, (20, 20)), "image/png")) for k in (1, 2)),
               *(("controls", (f"c{k}.png", png_bytes(k, (20, 20)), "image/png"))
                 for k in (11, 12))])
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(alice, submitted.json()["job_id"], timeout=240)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["pair"]["family"] == family and result["finetuned"] == model["id"]
    assert result["pair"]["finetuned_kind"] == kind
    assert result["provenance"]["models"]["finetuned"]["sha256"] == model["sha256"]
    assert len(result["images"]) == 2 and len(result["controls"]) == 2
    assert result["controls_test"] is not None and result["controls_test"]["n_controls"] == 2
    for image in result["images"]:
        assert image["verdict"] in ("member_evidence", "no_evidence", "inconclusive")
        assert image["p_value"] is not None and image["evidence_score"] is not None
        for picture_kind in ("recovered", "partial", "side_by_side"):
            picture = alice.get(image["artifacts"][picture_kind])
            assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG"), \
                picture_kind
    assert alice.delete(f"/models/{model['id']}").status_code == 204
