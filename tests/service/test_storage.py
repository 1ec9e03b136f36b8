"""Both storage backends obey one contract (the S3 one against a real S3 server)."""

from __future__ import annotations

import uuid

import pytest

from cgidm.storage import (
    InvalidKey,
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    StorageError,
    StorageUnavailable,
    open_storage,
)
from cgidm_testkit.processes import AWS_ENV, BUCKET, free_port


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Storage(BUCKET, f"unit-{uuid.uuid4().hex}", endpoint_url=endpoint)


def test_put_get_overwrite_exists_delete(storage):
    storage.put_bytes("a/b/c.bin", b"one")
    assert storage.get_bytes("a/b/c.bin") == b"one" and storage.exists("a/b/c.bin")
    storage.put_bytes("a/b/c.bin", b"two")
    assert storage.get_bytes("a/b/c.bin") == b"two"
    storage.delete("a/b/c.bin")
    storage.delete("a/b/c.bin")  # deleting twice is fine
    assert not storage.exists("a/b/c.bin")
    with pytest.raises(ObjectNotFound):
        storage.get_bytes("a/b/c.bin")
    with pytest.raises(ObjectNotFound):
        storage.open_stream("missing.png")


def test_listing_streaming_and_prefix_delete(storage):
    for key in ("jobs/1/job.json", "jobs/1/inputs/x.png", "jobs/2/job.json", "workers/w.json"):
        storage.put_bytes(key, key.encode())
    assert storage.list("jobs/") == ["jobs/1/inputs/x.png", "jobs/1/job.json", "jobs/2/job.json"]
    assert storage.list("jobs/1/in") == ["jobs/1/inputs/x.png"]
    assert storage.list_children("jobs/") == ["1", "2"]
    assert storage.list("nothing/") == [] and storage.list_children("nothing/") == []
    big = bytes(range(256)) * 1000
    storage.put_bytes("jobs/2/big.bin", big)
    assert b"".join(storage.open_stream("jobs/2/big.bin", chunk_size=4096)) == big
    storage.delete_prefix("jobs/1/")
    assert storage.list("jobs/") == ["jobs/2/big.bin", "jobs/2/job.json"]
    storage.put_json("doc.json", {"a": [1, 2]})
    assert storage.get_json("doc.json") == {"a": [1, 2]}
    storage.ping()


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "a//b", "a/./b", "a\\b", ""])
def test_keys_cannot_escape(storage, key):
    with pytest.raises(InvalidKey):
        storage.put_bytes(key, b"x")


def test_local_writes_leave_no_temp_files(tmp_path):
    store = LocalStorage(tmp_path)
    for i in range(5):
        store.put_bytes("k/v.json", str(i).encode())
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["v.json"]


def test_unreachable_s3_is_storage_unavailable(monkeypatch):
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    dead = S3Storage(BUCKET, endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    with pytest.raises(StorageUnavailable):
        dead.ping()
    with pytest.raises(StorageUnavailable):
        dead.put_bytes("a.txt", b"x")


def test_missing_bucket_is_not_ready(s3_endpoint, monkeypatch):
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StorageUnavailable):
        S3Storage("no-such-bucket", endpoint_url=s3_endpoint, max_attempts=1).ping()


def test_storage_urls(tmp_path):
    assert isinstance(open_storage(tmp_path.as_uri()), LocalStorage)
    assert open_storage(tmp_path.as_uri()).root == tmp_path.resolve()
    s3 = open_storage("s3://bucket/some/prefix", s3_endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Storage) and s3.prefix == "some/prefix/"
    for bad in ("ftp://x/y", "file://host/path", "s3:///nobucket", "relative/path"):
        with pytest.raises(StorageError):
            open_storage(bad)


def test_streaming_writer_commits_whole_or_leaves_nothing(storage):
    """Objects larger than one S3 part (8 MiB), written in odd chunks: readers see nothing
    until commit, the whole object after; an aborted writer leaves no object (and, on S3, no
    pending multipart upload)."""
    import hashlib
    import os

    data = os.urandom(17 * 1024 * 1024 + 123)  # three parts on S3
    writer = storage.open_writer("models/a/blob.safetensors")
    for start in range(0, len(data), 1_000_003):
        writer.write(data[start:start + 1_000_003])
        assert not storage.exists("models/a/blob.safetensors")
    writer.commit()
    assert writer.size == len(data)
    stored = b"".join(storage.open_stream("models/a/blob.safetensors", chunk_size=1 << 20))
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()

    with storage.open_writer("models/a/broken.safetensors") as broken:
        broken.write(data[: 9 * 1024 * 1024])
        broken.abort()
    with pytest.raises(RuntimeError), storage.open_writer("models/a/raised.safetensors") as w:
        w.write(b"x" * 100)
        raise RuntimeError("client went away")
    assert storage.list("models/") == ["models/a/blob.safetensors"]
    empty = storage.open_writer("models/a/empty.safetensors")
    empty.commit()
    assert storage.get_bytes("models/a/empty.safetensors") == b""
    if isinstance(storage, S3Storage):
        pending = storage.client.list_multipart_uploads(Bucket=BUCKET, Prefix=storage.prefix)
        assert pending.get("Uploads", []) == []
