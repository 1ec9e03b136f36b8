"""CGIDM_MAX_QUEUE_DEPTH under concurrent submissions (app/admission.py).

Before admission reserved a place, every submission that arrived while others were still
uploading saw the same queue depth and got in: 53 jobs were queued against a limit of 40 in the
load benchmark. These tests race many submissions at once, in-process against both reservation
stores (a real redis-server for the shared one) and over real HTTP against a gateway whose uploads
are slowed down so that every submission is admitted before any job reaches the queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from app.admission import LocalAdmission, QueueFull, RedisAdmission
from cgidm_testkit.processes import BUCKET, start_gateway, stop_process


def _race(admission, depth: int, limit: int, contenders: int) -> list[str]:
    """``contenders`` threads reserve at the same instant; returns the tokens granted."""
    barrier = threading.Barrier(contenders)
    granted: list[str] = []
    lock = threading.Lock()

    def contend() -> None:
        barrier.wait()
        try:
            token = admission.reserve(lambda: depth, limit)
        except QueueFull:
            return
        with lock:
            granted.append(token)

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return granted


@pytest.fixture
def redis_admission(redis_url, request) -> Iterator[RedisAdmission]:
    import redis

    client = redis.Redis.from_url(redis_url)
    key = f"cgidm:admissions:test-{request.node.name}"
    client.delete(key)
    yield RedisAdmission(client, key=key)
    client.delete(key)


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_concurrent_reservations_never_pass_the_limit(kind, request):
    admission = LocalAdmission() if kind == "local" else request.getfixturevalue("redis_admission")
    for depth in (0, 2, 5):
        granted = _race(admission, depth=depth, limit=5, contenders=24)
        # Reserving and counting are one atomic step: exactly the free places are given out.
        assert len(granted) == max(0, 5 - depth)
        assert admission.pending() == len(granted)
        for token in granted:
            admission.release(token)
        assert admission.pending() == 0
    # Uncontended, every free place is given out, and the next one is refused with the count.
    tokens = [admission.reserve(lambda: 3, 5) for _ in range(2)]
    with pytest.raises(QueueFull) as full:
        admission.reserve(lambda: 3, 5)
    assert (full.value.waiting, full.value.limit) == (5, 5)
    for token in tokens:
        admission.release(token)


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_broker_error_leaves_nothing_reserved(kind, request):
    admission = LocalAdmission() if kind == "local" else request.getfixturevalue("redis_admission")

    def broken() -> int:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        admission.reserve(broken, 5)
    assert admission.pending() == 0


def test_reservations_of_a_dead_gateway_expire(redis_admission):
    short = RedisAdmission(redis_admission.client, key=redis_admission.key, ttl=0.5)
    short.reserve(lambda: 0, 1)  # never released: its gateway "died" mid-upload
    with pytest.raises(QueueFull):
        short.reserve(lambda: 0, 1)
    time.sleep(0.6)
    assert short.pending() == 0
    short.release(short.reserve(lambda: 0, 1))


# -- over HTTP ---------------------------------------------------------------------------------

LIMIT = 3
CONTENDERS = 10


@pytest.fixture(scope="module")
def race_gateway(service_env, service_root) -> Iterator[str]:
    """A gateway whose queue (no worker reads it) takes ``LIMIT`` jobs."""
    env = {**service_env, "CGIDM_QUEUE": "admission-race", "CGIDM_MAX_QUEUE_DEPTH": str(LIMIT),
           "CGIDM_STORAGE_URL": f"s3://{BUCKET}/admission-race"}
    proc, url = start_gateway(env, service_root / "gateway-admission.log")
    yield url
    stop_process(proc)


def _slow_multipart(png: bytes, boundary: str, pause: float) -> Iterator[bytes]:
    """A valid submission body that takes ``pause`` seconds to arrive."""
    fields = {"pretrained": "tiny-base", "finetuned": "tiny-ft", "steps": "1"}
    for name, value in fields.items():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
               f"{value}\r\n").encode()
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; "
           "filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    time.sleep(pause)  # admitted already (before the body is read); the job is not queued yet
    yield png + f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.slow  # starts a gateway; uploads paced over seconds
def test_concurrent_slow_uploads_queue_exactly_the_limit(race_gateway):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 40, 200)).save(buffer, format="PNG")
    png = buffer.getvalue()
    barrier = threading.Barrier(CONTENDERS)
    statuses: list[int] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        boundary = f"cgidm-race-{i}"
        with httpx.Client(base_url=race_gateway, timeout=60) as client:
            barrier.wait()
            response = client.post(
                "/authenticate", content=_slow_multipart(png, boundary, pause=2.0),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with lock:
            statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.json()["detail"][0]["type"] == "queue_full"

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(CONTENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(statuses)) == [202, 429], statuses
    # Nothing reads this queue, so the number accepted is final: the limit, not one more (the
    # check alone let all ten in: each saw an empty queue while the others were uploading).
    accepted = statuses.count(202)
    assert accepted == LIMIT, statuses
    with httpx.Client(base_url=race_gateway, timeout=30) as client:
        metrics = client.get("/metrics").text
        depth = next(line for line in metrics.splitlines()
                     if line.startswith("cgidm_queue_depth "))
        assert float(depth.split()[1]) == accepted
        in_flight = next(line for line in metrics.splitlines()
                         if line.startswith("cgidm_submissions_in_flight "))
        assert float(in_flight.split()[1]) == 0  # every request ended: nothing stays reserved


def test_a_submission_gives_its_place_back_before_the_client_reads_the_answer(tmp_path,
                                                                              registry_file):
    """A client that sends its next job as soon as the 202 arrives must not meet its previous
    job counted twice (queued, and still reserved) and get a 429 below the limit: the gateway
    releases the reservation when the answer starts, not after it has been sent."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from cgidm.settings import Settings
    from cgidm_testkit.processes import png_bytes
    from tests.service.inprocess import LIMITS

    app = create_app(Settings(data_dir=tmp_path, models=str(registry_file), max_queue_depth=2,
                              **LIMITS))
    held_when_answered: list[int] = []

    async def watched(scope, receive, send):
        async def watched_send(message):
            if message["type"] == "http.response.start" and scope.get("path") == "/authenticate":
                held_when_answered.append(app.state.services.admission.pending())
            await send(message)

        await app(scope, receive, watched_send)

    with TestClient(watched, client=("127.0.0.1", 50000)) as http:
        def submit() -> int:
            return http.post("/authenticate", data={"pretrained": "tiny-base",
                                                    "finetuned": "tiny-ft"},
                             files=[("images", ("p.png", png_bytes(1), "image/png"))]).status_code

        assert [submit(), submit(), submit()] == [202, 202, 429]
    assert held_when_answered == [0, 0, 0]
