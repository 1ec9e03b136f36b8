"""Hostile and broken input: every refusal is a 4xx JSON error that leaves nothing in storage;
odd but valid pictures are stored with exactly the pixels the library reads from the original.

Refusals and stored pictures are the route's contract: they run in-process (FastAPI's TestClient,
``app_client``, embedded storage). A real gateway process is kept where it is the point: an upload
refused while it streams in (raw sockets, chunked bodies, uvicorn reading them), pictures rendered
by a real worker, and a full queue counted on the real Redis broker.
"""

from __future__ import annotations

import io
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from cgidm_testkit.processes import (
    BUCKET,
    png_bytes,
    s3_client,
    send_unfinished_chunked,
    start_gateway,
    stop_process,
    wait_for_job,
)
from tests.service.inprocess import LIMITS

MAX_UPLOAD = LIMITS["max_upload_bytes"]  # the session's gateways, in-process or over HTTP


# ------------------------------------------------------------------------------------------
# pictures


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _smooth(size: tuple[int, int]) -> Image.Image:
    """A gradient picture: JPEG keeps it nearly intact, so lossy round trips stay comparable."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    rgb = np.stack([x, y, 255 - (x + y) / 2], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims a huge size: the decompression-bomb shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def _eps() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


JPEG = _encode(_smooth((40, 30)), "JPEG", quality=95)
PNG = png_bytes(3)


# ------------------------------------------------------------------------------------------
# refusals


def _job_ids(app_client: Any) -> set[str]:
    """The jobs in the in-process gateway's (embedded) storage."""
    return set(app_client.app.state.services.store.storage.list_children("jobs/"))


def _s3_job_ids(endpoint: str) -> set[str]:
    """The jobs in the session's S3 bucket (the real gateway's storage)."""
    client = s3_client(endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="svc/jobs/", Delimiter="/")
    return {p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])}


HOSTILE = [
    # (description, form fields, files, status, loc, type)
    ("text file", {}, [("images", "notes.txt", b"this is not a picture")], 422,
     ["body", "images"], "not_an_image"),
    ("PostScript (would run Ghostscript)", {}, [("images", "x.eps", _eps())], 422,
     ["body", "images"], "not_an_image"),
    ("empty file", {}, [("images", "empty.png", b"")], 422, ["body", "images"], "empty_file"),
    ("truncated PNG", {}, [("images", "cut.png", PNG[: len(PNG) // 2])], 422,
     ["body", "images"], "corrupt_image"),
    ("truncated JPEG", {}, [("images", "cut.jpg", JPEG[: len(JPEG) // 2])], 422,
     ["body", "images"], "corrupt_image"),
    ("PNG claiming 100000x100000 pixels", {}, [("images", "bomb.png",
                                                _png_header_only(100_000, 100_000))], 422,
     ["body", "images"], "image_too_large"),
    ("PNG over CGIDM_MAX_IMAGE_PIXELS", {}, [("images", "big.png",
                                              _png_header_only(3000, 3000))], 422,
     ["body", "images"], "image_too_large"),
    ("float TIFF", {}, [("images", "f.tif", _encode(Image.new("F", (8, 8), 0.5), "TIFF"))], 422,
     ["body", "images"], "unsupported_image"),
    ("control that is no image", {}, [("images", "a.png", PNG), ("controls", "c.gif",
                                                                 b"GIF89a garbage")], 422,
     ["body", "controls"], "not_an_image"),
    ("file over CGIDM_MAX_UPLOAD_BYTES", {}, [("images", "big.png",
                                               b"\x89PNG" + bytes(MAX_UPLOAD + 10))], 413,
     ["body", "images"], "file_too_large"),
    ("too many files", {}, [("images", f"{i}.png", PNG) for i in range(4)]
     + [("controls", f"c{i}.png", PNG) for i in range(3)], 422, ["body", "controls"],
     "too_many_files"),
    ("unknown model", {"finetuned": "sd99"}, None, 422, ["body", "finetuned"], "unknown_model"),
    ("path traversal", {"pretrained": "../../etc/passwd"}, None, 422, ["body", "pretrained"],
     "invalid_model_reference"),
    ("absolute path", {"finetuned": "/models/x"}, None, 422, ["body", "finetuned"],
     "invalid_model_reference"),
    ("URL", {"finetuned": "https://example.org/x.safetensors"}, None, 422,
     ["body", "finetuned"], "invalid_model_reference"),
    ("Windows path", {"finetuned": "C:\\models\\x"}, None, 422, ["body", "finetuned"],
     "invalid_model_reference"),
    ("Hub id", {"finetuned": "someone/model"}, None, 422, ["body", "finetuned"],
     "invalid_model_reference"),
    ("prompt of 76 words", {"prompt": " ".join(["word"] * 76)}, None, 422, ["body", "prompt"],
     "value_error"),
    ("prompt over 1000 characters", {"prompt": "x" * 1001}, None, 422, ["body", "prompt"],
     "string_too_long"),
    ("prompt with a NUL", {"prompt": "a\x00b"}, None, 422, ["body", "prompt"], "value_error"),
    ("unknown field", {"steps_": "3"}, None, 422, ["body", "steps_"], "unknown_field"),
    ("unknown metric", {"metric": "l2"}, None, 422, ["body", "metric"], "literal_error"),
    ("bad boolean", {"reencode_partial": "perhaps"}, None, 422, ["body", "reencode_partial"],
     "bool_parsing"),
]
NUMERIC = [
    ("steps", "0"), ("steps", "10001"), ("steps", "-5"), ("steps", "1e3"), ("steps", "2.5"),
    ("seed", "-1"), ("seed", str(2**32)), ("batch_size", "0"), ("batch_size", "65"),
    ("alpha", "0"), ("alpha", "-1"), ("alpha", "nan"), ("alpha", "inf"), ("alpha", "1001"),
    ("epsilon", "0"), ("epsilon", "nan"), ("epsilon", "-inf"), ("epsilon", "1e7"),
    ("t_min", "-1"), ("t_min", "1000"), ("t_max", "1000"), ("mc_samples", "0"),
    ("mc_samples", "65"), ("cell", "0"), ("cell", "1025"), ("resolution", "7"),
    ("resolution", "4097"), ("resolution", "512.5"),
]


def _post(client: Any, fields: dict, files: list | None) -> Any:
    data = {"pretrained": "tiny-base", "finetuned": "tiny-ft", "steps": "1", **fields}
    files = files if files is not None else [("images", "a.png", PNG)]
    return client.post("/authenticate", data=data,
                       files=[(field, (name, body, "application/octet-stream"))
                              for field, name, body in files])


def test_hostile_requests_are_4xx_and_store_nothing(app_client):
    client = app_client
    before = _job_ids(client)
    failures = []
    for description, fields, files, status, loc, kind in HOSTILE:
        started = time.monotonic()
        response = _post(client, fields, files)
        elapsed = time.monotonic() - started
        body = response.json()
        got = (response.status_code, body["detail"][0]["loc"], body["detail"][0]["type"])
        if got != (status, loc, kind) or not body["detail"][0]["msg"]:
            failures.append((description, got, body))
        assert elapsed < 5, f"{description}: {elapsed:.1f} s (decoded a bomb?)"
    for field, value in NUMERIC:
        response = _post(client, {field: value}, None)
        detail = response.json()["detail"]
        if response.status_code != 422 or detail[0]["loc"] != ["body", field]:
            failures.append((f"{field}={value}", response.status_code, detail))
    assert not failures, failures
    assert _job_ids(client) == before  # not one object written by a refused request


def _multipart_head(url: str, boundary: str) -> str:
    host = url.removeprefix("http://")
    return (f"POST /authenticate HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")


@pytest.mark.slow  # raw sockets against a real gateway: how uvicorn streams the body is the point
def test_oversized_upload_is_refused_while_it_streams(gateway_url, s3_endpoint):
    """No Content-Length (chunked): the gateway counts the file's bytes as they arrive and
    answers 413 once the limit is crossed, long before the 20 MB the client means to send."""
    before = _s3_job_ids(s3_endpoint)
    boundary = "xyzBOUNDARYxyz"

    def body() -> Iterator[bytes]:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"pretrained\"\r\n\r\n"
               f"tiny-base\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; "
               f"filename=\"huge.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
        for _ in range(20 * 1024 * 1024 // 16384):
            yield bytes(16384)

    head = _multipart_head(gateway_url, boundary)
    response, sent = send_unfinished_chunked(gateway_url, head, body())
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"file_too_large" in response and b"CGIDM_MAX_UPLOAD_BYTES" in response
    assert sent < 4 * MAX_UPLOAD, f"the server read {sent} bytes before refusing"

    def fields() -> Iterator[bytes]:  # many small text fields: the total limit (1.5 MB) trips
        for i in range(400):
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\n"
                   + "x" * 8000 + "\r\n").encode()

    head = _multipart_head(gateway_url, boundary)
    response, sent = send_unfinished_chunked(gateway_url, head, fields())
    assert response.startswith(b"HTTP/1.1 413") and b"request_too_large" in response
    assert sent < 2_500_000
    host = gateway_url.removeprefix("http://")
    with socket.create_connection(tuple(host.split(":")), timeout=10) as sock:  # type: ignore
        sock.sendall(f"POST /authenticate HTTP/1.1\r\nHost: {host}\r\nContent-Length: "
                     f"{10**9}\r\nContent-Type: image/png\r\n\r\nxxxx".encode())
        answer = b""  # at once: a declared size over the limit is not read at all
        while b"}]}" not in answer and (more := sock.recv(65536)):
            answer += more
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
    assert _s3_job_ids(s3_endpoint) == before


# ------------------------------------------------------------------------------------------
# odd but valid pictures


def _stored_input(app_client: Any, job_id: str, index: int = 0) -> bytes:
    """The picture the in-process gateway stored for a job's input, as the worker reads it."""
    job = app_client.get(f"/jobs/{job_id}").json()
    key = job["inputs"][index]["key"]
    return app_client.app.state.services.store.storage.get_bytes(key)


def _accept(client: Any, files: list) -> dict:
    response = _post(client, {}, files)
    assert response.status_code == 202, response.text
    return response.json()


def _cmyk(image: Image.Image) -> Image.Image:
    return image.convert("CMYK")


def _sixteen_bit() -> Image.Image:
    ramp = (np.arange(12 * 10).reshape(10, 12) * 541).astype(np.uint16)
    return Image.fromarray(ramp)


def _palette_with_transparency() -> Image.Image:
    image = _noise((12, 10), seed=4).quantize(16)
    image.info["transparency"] = 3
    return image


ODD_MODES = {
    "cmyk.jpg": lambda: _encode(_cmyk(_smooth((24, 20))), "JPEG", quality=95),
    "cmyk.tif": lambda: _encode(_cmyk(_noise((24, 20), 1)), "TIFF"),
    "palette.png": lambda: _encode(_noise((24, 20), 2).quantize(32), "PNG"),
    "palette-transparent.png": lambda: _encode(_palette_with_transparency(), "PNG"),
    "grey.png": lambda: _encode(_noise((24, 20), 3).convert("L"), "PNG"),
    "grey-alpha.png": lambda: _encode(_noise((24, 20), 5).convert("LA"), "PNG"),
    "rgba.png": lambda: _encode(_noise((24, 20), 6).convert("RGBA"), "PNG"),
    "bilevel.png": lambda: _encode(_noise((24, 20), 7).convert("1"), "PNG"),
    "sixteen-bit.png": lambda: _encode(_sixteen_bit(), "PNG"),
    "sixteen-bit.tif": lambda: _encode(_sixteen_bit(), "TIFF"),
    "int32.tif": lambda: _encode(_sixteen_bit().convert("I"), "TIFF"),
    "bmp.bmp": lambda: _encode(_noise((24, 20), 8), "BMP"),
    "webp.webp": lambda: _encode(_noise((24, 20), 9), "WEBP", lossless=True),
}


def test_odd_modes_are_stored_as_the_library_reads_them(app_client):
    client = app_client
    """The worker reads the stored PNG with load_image: it must see exactly the pixels that
    load_image gives for the original file (what `cgidm check` on that file would see)."""
    from cgidm_core.images import load_image

    for name, make in ODD_MODES.items():
        original = make()
        job_id = _accept(client, [("images", name, original)])["job_id"]
        stored = _stored_input(client, job_id)
        assert stored.startswith(b"\x89PNG"), name
        expected = np.asarray(load_image(original))
        got = np.asarray(load_image(stored))
        assert got.shape == expected.shape and np.array_equal(got, expected), name


def test_cmyk_round_trip_keeps_colours(app_client):
    client = app_client
    from cgidm_core.images import load_image

    rgb = _noise((24, 20), 11)
    for fmt, tolerance in (("TIFF", 0), ("JPEG", 2)):
        params = {"quality": 100} if fmt == "JPEG" else {}
        job_id = _accept(client, [("images", f"c.{fmt.lower()}",
                                   _encode(_cmyk(rgb if fmt == "TIFF" else _smooth((24, 20))),
                                           fmt, **params))])["job_id"]
        stored = np.asarray(load_image(_stored_input(client, job_id)), dtype=int)
        source = np.asarray(rgb if fmt == "TIFF" else _smooth((24, 20)), dtype=int)
        assert np.abs(stored - source).max() <= tolerance, fmt  # TIFF: exact


def test_exif_rotated_jpeg_is_stored_upright(app_client):
    client = app_client
    from cgidm_core.images import load_image

    upright = _smooth((48, 32))
    # Orientation 6: the camera stored the picture turned; viewers turn it 90 degrees clockwise.
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    params = {"quality": 100, "subsampling": 0}
    first = _accept(client, [("images", "up.jpg", _encode(upright, "JPEG", **params))])
    second = _accept(client, [("images", "turned.jpg",
                               _encode(sideways, "JPEG", exif=exif, **params))])
    a = np.asarray(load_image(_stored_input(client, first["job_id"])), dtype=int)
    b = np.asarray(load_image(_stored_input(client, second["job_id"])), dtype=int)
    assert a.shape == b.shape == (32, 48, 3)
    assert np.abs(a - b).max() <= 3  # the same picture, up to JPEG rounding
    stored = Image.open(io.BytesIO(_stored_input(client, second["job_id"])))
    assert stored.getexif().get(0x0112) in (None, 1)  # nothing left to rotate it twice


def test_animated_gif_uses_the_first_frame_and_says_so(app_client):
    client = app_client
    frames = [Image.new("RGB", (20, 16), colour) for colour in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    accepted = _accept(client, [("images", "anim.gif", buffer.getvalue())])
    assert accepted["warnings"] == ["anim.gif: GIF image with 3 frames; only the first frame "
                                    "is used"]
    job = client.get(f"/jobs/{accepted['job_id']}").json()
    assert job["inputs"][0]["frames"] == 3
    stored = Image.open(io.BytesIO(_stored_input(client, accepted["job_id"])))
    assert stored.convert("RGB").getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.slow  # a real worker renders the pictures
def test_worker_renders_cmyk_and_palette_uploads_in_the_right_colours(worker, client):
    """Through the whole stack: the kept half of `partial.png` (pixel-space model: the original
    itself) matches the library's reading of the original file, for a CMYK JPEG and a palette
    PNG; a wrong colour conversion would match almost nowhere."""
    from cgidm_core.images import load_image, to_pil, to_tensor

    uploads = {"cmyk": _encode(_cmyk(_smooth((40, 32))), "JPEG", quality=95),
               "palette": _encode(_noise((40, 32), 12).quantize(64), "PNG")}
    response = _post(client, {"steps": "1"},
                     [("images", f"{n}.{'jpg' if n == 'cmyk' else 'png'}", b)
                      for n, b in uploads.items()])
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job_id"])
    assert job["status"] == "succeeded", job
    for item in job["result"]["images"]:
        partial = client.get(item["artifacts"]["partial"])
        assert partial.status_code == 200
        got = np.asarray(Image.open(io.BytesIO(partial.content)).convert("RGB"), dtype=int)
        size = got.shape[0]
        expected = np.asarray(to_pil(to_tensor([load_image(uploads[item["name"]])], size))[0],
                              dtype=int)
        same = (np.abs(got - expected).max(axis=-1) <= 1).mean()
        assert same >= 0.45, (item["name"], same)  # the checkerboard keeps half the pixels


# ------------------------------------------------------------------------------------------
# a full queue


@pytest.fixture(scope="module")
def small_queue_gateway(service_env, service_root):
    """A gateway whose queue (no worker reads it) accepts two jobs at most."""
    env = {**service_env, "CGIDM_QUEUE": "depth-test", "CGIDM_MAX_QUEUE_DEPTH": "2",
           "CGIDM_QUEUE_RETRY_AFTER": "7", "CGIDM_STORAGE_URL": f"s3://{BUCKET}/depth"}
    proc, url = start_gateway(env, service_root / "gateway-depth.log")
    yield url
    stop_process(proc)


@pytest.mark.slow  # the depth is counted on the real Redis broker
def test_full_queue_answers_429_with_retry_after(small_queue_gateway, s3_endpoint):
    from cgidm_testkit.processes import bucket_keys

    with httpx.Client(base_url=small_queue_gateway, timeout=30) as client:
        accepted = [_post(client, {}, None) for _ in range(2)]
        assert [r.status_code for r in accepted] == [202, 202]
        stored = bucket_keys(s3_endpoint, "depth/")
        refused = _post(client, {}, None)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "7"
        assert refused.json()["detail"][0]["type"] == "queue_full"
        assert bucket_keys(s3_endpoint, "depth/") == stored  # the refused job left nothing
        assert client.get("/readyz").status_code == 200  # full is not broken
