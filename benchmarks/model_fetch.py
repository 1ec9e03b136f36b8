"""What the hostile-header check and a verified hub fetch cost, on this machine.

1. ``parse_header`` (nesting scan + JSON decode + checks) on headers real files have (a LoRA's,
   an SD single-file checkpoint's) and on hostile ones at the 64 MiB header limit (all
   brackets, deep nesting, escapes): the scan is linear, so even the worst case is bounded.
2. A Civitai fetch of one file from the local stand-in (``cgidm_testkit.hub_servers``, HTTP on
   127.0.0.1) into the CLI's content-addressed cache: download + the sha256 check before use,
   then the same reference again (a cache hit: metadata request + one hash of the file).

    python -m benchmarks.model_fetch [--mib 256]

Prints a table; nothing here is asserted (timings belong to no test).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _header(tensors: int) -> bytes:
    document, position = {}, 0
    for i in range(tensors):
        document[f"model.diffusion_model.block{i}.lora_up.weight"] = {
            "dtype": "F16", "shape": [320, 4], "data_offsets": [position, position + 2560]}
        position += 2560
    document["__metadata__"] = {"ss_instance_prompt": "sks style", "note": "x" * 2000}
    return json.dumps(document).encode()


def header_rows() -> list[tuple[str, int, float, str]]:
    from cgidm.model_files import MAX_HEADER_BYTES, ModelFileError, parse_header

    cases = {
        "LoRA header (800 tensors)": _header(800),
        "SD checkpoint header (1,200 tensors)": _header(1200),
        "64 MiB of []": b"[]" * (MAX_HEADER_BYTES // 2),
        "64 MiB nested [[[...]]]": b"[" * (MAX_HEADER_BYTES // 2) + b"]" * (MAX_HEADER_BYTES // 2),
        '64 MiB of escaped quotes "\\"\\"...': b'"' + b'\\"' * (MAX_HEADER_BYTES // 2 - 1) + b'"',
        "10,001 nested arrays": b"[" * 10_001 + b"]" * 10_001,
    }
    rows = []
    for name, raw in cases.items():
        outcome = "parsed"

        def run(raw: bytes = raw) -> None:
            nonlocal outcome
            try:
                parse_header(raw)
            except ModelFileError as exc:
                outcome = f"refused ({str(exc)[27:60]}...)"

        rows.append((name, len(raw), _time(run), outcome))
    return rows


def fetch_rows(mib: int) -> list[tuple[str, float, float]]:
    from cgidm.model_fetch import FetchConfig, fetch
    from cgidm.model_refs import parse_reference
    from cgidm_testkit.hub_servers import HubServer

    with tempfile.TemporaryDirectory() as tmp, HubServer() as hub:
        path = Path(tmp) / "big.safetensors"
        path.write_bytes(os.urandom(mib * 1024 * 1024))
        hub.add_civitai_file(1, path)
        config = FetchConfig(cache_dir=Path(tmp) / "cache", civitai_url=hub.url, offline=False)
        rows = []
        for label in ("first fetch (download + sha256 check)", "again (cache hit)"):
            start = time.perf_counter()
            fetch(parse_reference("civitai:1"), config)
            seconds = time.perf_counter() - start
            rows.append((label, seconds, mib / seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the fetched file")
    args = parser.parse_args()
    print("| header | bytes | best of 3 | outcome |\n|---|---:|---:|---|")
    for name, size, seconds, outcome in header_rows():
        print(f"| {name} | {size:,} | {seconds * 1000:.1f} ms | {outcome} |")
    print(f"\n| Civitai fetch, {args.mib} MiB, local stand-in | seconds | MiB/s |\n|---|---:|---:|")
    for label, seconds, rate in fetch_rows(args.mib):
        print(f"| {label} | {seconds:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
