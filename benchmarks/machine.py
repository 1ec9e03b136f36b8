"""What the benchmarks need to know about the process and the machine they run on.

Resident memory comes from ``/proc/self/status`` (VmRSS now, VmHWM the peak), which counts what
the process really holds, including what torch's allocator and glibc keep; the peak can be reset
between phases through ``/proc/self/clear_refs`` so one phase's peak does not hide another's.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import gc
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Start a new VmHWM measurement (Linux >= 4.0); False if the kernel refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back, so RSS shows what is really held."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def set_threads(threads: int | None) -> int:
    import torch

    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def machine_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in load_average()],
    }
    with contextlib.suppress(ValueError, OSError):
        facts["memory_total_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def run_child(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process and parse the JSON it prints on its last line.

    A fresh process per measurement keeps one layout's memory from leaking into the next one's
    figures (freed memory is not always returned to the system). ``args`` start with
    ``-m benchmarks.NAME``: run from the repository root, the child imports the packages the way
    its parent did.
    """
    import json

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"measurement {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"measurement {' '.join(args)} printed no JSON:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"
