"""Model upload benchmark: throughput of POST /models and the gateway's memory while it streams.

Starts, on 127.0.0.1 only, an S3 server (moto) and the real gateway (uvicorn ``app.main:app``)
as the tests do (cgidm_testkit/processes.py), then streams a generated safetensors file of
``--size`` bytes from the client: a valid header announcing one tensor, then zeros produced on
the fly, so neither the client nor this script ever holds the file. The same upload goes to S3
(multipart upload) and to local folder storage. While each upload runs, the gateway's resident
memory is sampled every 50 ms from /proc, and its kernel-recorded peak (VmHWM) is read at the
end, so a spike between samples cannot hide.

Prints a table (seconds, MB/s, gateway RSS before / peak / after, peak growth as a fraction of
the file) and, for S3, moto's own peak (moto keeps objects in memory; a real S3 or MinIO does
not). Exit code 1 when the gateway's peak grew by more than ``--max-growth`` of the file.

    .venv/bin/python -m benchmarks.upload --size 2GiB
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from cgidm_testkit.processes import (
    BUCKET,
    child_env,
    s3_client,
    start_gateway,
    start_moto,
    stop_process,
)

ROOT = Path(__file__).resolve().parents[1]

BOUNDARY = "cgidmUploadBenchmark"
CHUNK = 1024 * 1024


def parse_size(text: str) -> int:
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2,
             "GB": 1000**3}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def body(size: int) -> tuple[Iterator[bytes], int, int]:
    """A multipart body holding a LoRA-named safetensors file of about ``size`` bytes (the
    data is a whole number of float32s): (chunks, body length, file size)."""
    raw = b""
    for _ in range(3):  # the header's length depends on the data size it announces
        data_bytes = size - 8 - len(raw)
        data_bytes -= data_bytes % 4
        header = {"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": {
            "dtype": "F32", "shape": [data_bytes // 4], "data_offsets": [0, data_bytes]}}
        raw = json.dumps(header).encode()
    file_head = struct.pack("<Q", len(raw)) + raw
    total_file = len(file_head) + data_bytes
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"finetuned_from\"\r\n\r\n"
            f"bench-base\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"suspect.safetensors\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    zeros = bytes(CHUNK)

    def chunks() -> Iterator[bytes]:
        yield head + file_head
        left = data_bytes
        while left > 0:
            n = min(CHUNK, left)
            yield zeros if n == CHUNK else zeros[:n]
            left -= n
        yield tail

    return chunks(), len(head) + total_file + len(tail), total_file


def measure(url: str, pid: int, size: int) -> dict[str, float]:
    chunks, length, size = body(size)
    before = status_kib(pid, "VmRSS") * 1024
    reset_peak(pid)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(status_kib(pid, "VmRSS") * 1024)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with httpx.Client(timeout=None) as client:
        response = client.post(f"{url}/models", content=chunks, headers={
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Length": str(length)})
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if response.status_code != 201:
        raise SystemExit(f"upload failed: {response.status_code} {response.text[:500]}")
    model = response.json()
    assert model["size_bytes"] == size, model
    peak = max(status_kib(pid, "VmHWM") * 1024, *samples)
    return {"seconds": seconds, "mb_per_s": size / seconds / 1e6, "rss_before": before,
            "rss_peak": peak, "rss_after": status_kib(pid, "VmRSS") * 1024,
            "growth_fraction": (peak - before) / size, "id": model["id"], "file_bytes": size}


def mib(value: float) -> str:
    return f"{value / 1024**2:,.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", action="append", help="file size (e.g. 2GiB, 500MB); "
                        "repeat to compare sizes in one run (default: 256MiB and 2GiB)")
    parser.add_argument("--max-growth-mib", type=float, default=128,
                        help="largest accepted growth of the gateway's peak memory, in MiB")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in (args.size or ["256MiB", "2GiB"])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cgidm-upload-bench-") as tmp:
        root = Path(tmp)
        registry = root / "models.json"
        registry.write_text(json.dumps({"models": [
            {"id": "bench-base", "family": "stable-diffusion", "path": str(root / "none")}]}))
        moto, endpoint = start_moto(root)
        try:
            for backend in ("s3", "local"):
                storage = f"s3://{BUCKET}/bench" if backend == "s3" else \
                    (root / "storage").as_uri()
                env = child_env({"CGIDM_STORAGE_URL": storage, "CGIDM_S3_ENDPOINT_URL": endpoint,
                                 "CGIDM_MODELS": str(registry),
                                 "CGIDM_DATA_DIR": str(root / f"data-{backend}")})
                for size in sizes:  # a fresh gateway per upload: its peak is this upload's
                    gateway, url = start_gateway(env, root / f"gateway-{backend}.log")
                    try:
                        reset_peak(moto.pid)
                        row = {"backend": backend, **measure(url, gateway.pid, size)}
                        if backend == "s3":
                            row["moto_peak"] = status_kib(moto.pid, "VmHWM") * 1024
                            client = s3_client(endpoint)
                            head = client.list_objects_v2(Bucket=BUCKET, Prefix="bench/models/")
                            stored = [o for o in head.get("Contents", [])
                                      if o["Key"].endswith(".safetensors")]
                            assert [o["Size"] for o in stored] == [row["file_bytes"]], stored
                            client.delete_object(Bucket=BUCKET, Key=stored[0]["Key"])
                            client.delete_objects(Bucket=BUCKET, Delete={"Objects": [
                                {"Key": o["Key"]} for o in client.list_objects_v2(
                                    Bucket=BUCKET, Prefix="bench/").get("Contents", [])]})
                        else:
                            for blob in (root / "storage").rglob("*.safetensors"):
                                blob.unlink()
                            for record in (root / "storage").rglob("records/*.json"):
                                record.unlink()
                        rows.append(row)
                    finally:
                        stop_process(gateway)
        finally:
            stop_process(moto)
    load = os.getloadavg()
    print(f"\nPOST /models of a generated safetensors file, streamed from the client "
          f"(load average {load[0]:.1f}, {os.cpu_count()} CPUs)\n")
    print(f"{'storage':<8}{'file':>10}{'seconds':>9}{'MB/s':>7}{'RSS before':>12}"
          f"{'RSS peak':>10}{'growth':>9}{'growth/file':>13}")
    for row in rows:
        print(f"{row['backend']:<8}{mib(row['file_bytes']):>10}{row['seconds']:>9.1f}"
              f"{row['mb_per_s']:>7.0f}{mib(row['rss_before']):>12}{mib(row['rss_peak']):>10}"
              f"{mib(row['rss_peak'] - row['rss_before']):>9}{row['growth_fraction']:>13.2%}")
    for row in rows:
        if "moto_peak" in row:
            print(f"moto (S3 server, keeps objects in memory) peak after the "
                  f"{mib(row['file_bytes'])} upload: {mib(row['moto_peak'])}")
    print("The gateway's growth should not depend on the file's size (at most two 8 MiB S3 "
          "parts and a 1 MiB hand-off buffer are held).")
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "load": load, "rows": rows},
                                              indent=2))
    worst = max(r["rss_peak"] - r["rss_before"] for r in rows)
    return 0 if worst <= args.max_growth_mib * 1024**2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
