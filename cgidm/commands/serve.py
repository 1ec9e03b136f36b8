"""``cgidm serve``: the whole service on one machine, with no servers to install.

It starts the same two processes as docker-compose, the gateway (uvicorn ``app.main:app``) and
one Celery worker (``celery -A worker.celery_app worker --pool=solo -c 1``); only the settings
differ: a local folder for storage and a SQLite file as the broker (see ``cgidm.settings``).
Ctrl-C stops both: the gateway at once, the worker with a warm shutdown, which interrupts a
running job within a few PGD steps and puts it back in the queue, so it runs again on the next
start.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

STOP_TIMEOUT = 15.0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the HTTP service locally (gateway + one worker, no servers needed)",
        description="Start the gateway and one worker. Settings come from CGIDM_* variables "
        "(see docs/SERVICE.md); by default everything lives under ./cgidm-data.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--data-dir", help="folder for storage and broker (CGIDM_DATA_DIR)")
    parser.set_defaults(func=run)


def _python_path() -> str:
    """Make ``app`` and ``worker`` importable in the children, installed or not."""
    root = Path(__file__).resolve().parents[2]
    parts = [str(root)] if (root / "app").is_dir() else []
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


class EmbeddedService:
    """The gateway and one worker as child processes; a context manager that stops both."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        env: dict[str, str | None] | None = None,
        log: IO[Any] | None = None,
    ):
        from cgidm.settings import Settings

        self.host, self.port = host, port
        # ``env`` overrides the environment; a None value removes a variable.
        base = {**os.environ, **(env or {})}
        base = {k: v for k, v in base.items() if v is not None}
        prefixed = {k: v for k, v in base.items() if k.startswith("CGIDM_")}
        # Settings are read here once, from the same variables, and handed down resolved, so
        # both children use the same absolute data folder whatever their working directory.
        # strings from the environment: pydantic-settings parses each one into its field's type
        self.settings = Settings(**{k[len("CGIDM_"):].lower(): v  # type: ignore[arg-type]
                                    for k, v in prefixed.items()})
        self.env = {**base, **self.settings.as_environment(), "PYTHONPATH": _python_path()}
        self.log = log
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def _prepare_broker(self) -> None:
        """Create the SQLite broker's tables and queue once, before two processes race to."""
        from cgidm.job_queue import make_celery
        from cgidm.queue_routing import declare_queues

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.embedded_broker:
            with make_celery(self.settings).connection_for_write() as conn:
                declare_queues(conn, self.settings)  # the plain queue and the slot queues

    def start(self) -> EmbeddedService:
        self._prepare_broker()
        out = self.log if self.log is not None else None
        common: dict[str, Any] = {"env": self.env, "stdout": out, "stderr": out,
                                  "start_new_session": True}
        self.processes["worker"] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
             "--pool=solo", "-c", "1", "-l", "info"], **common)
        self.processes["gateway"] = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", self.host,
             "--port", str(self.port), "--log-level", "warning"], **common)
        return self

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} process exited with code {proc.returncode}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until ``/readyz`` answers 200 (broker and storage reachable)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the service at {self.url} was not ready after {timeout:.0f} s")

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown for the worker
        for proc in self.processes.values():
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> EmbeddedService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def install_stop_signals() -> None:
    """Make Ctrl-C (SIGINT) and a process manager's SIGTERM stop the service, children included.

    SIGINT is installed explicitly too: Python turns it into KeyboardInterrupt only if it was not
    ignored when the interpreter started, and a shell without job control starts every
    background command (``cgidm serve &`` in a script, or a backgrounded ``make test`` and all
    it runs) with SIGINT ignored. Left alone, ``kill -INT`` would then do nothing at all.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def run(args: argparse.Namespace) -> int:
    install_stop_signals()
    from cgidm.settings import is_loopback_host

    env = {"CGIDM_DATA_DIR": args.data_dir} if args.data_dir else {}
    service = EmbeddedService(args.host, args.port, env)
    keys = service.settings.api_key_hashes
    if not keys and not is_loopback_host(args.host):
        from cgidm_core.errors import ConfigError

        raise ConfigError(
            f"refusing to listen on {args.host} without API keys: anyone who can reach it could "
            "read every job. Make a key with `cgidm keys new NAME` and set CGIDM_API_KEYS, or "
            "listen on 127.0.0.1 (the default)")
    access = (f"API keys required ({len(keys)} configured)" if keys else
              "no API keys: open to this machine only (127.0.0.1)")
    return _serve_until_stopped(service, access)


def _serve_until_stopped(service: EmbeddedService, access: str) -> int:
    with service:
        try:
            service.wait_ready()
            print(f"cgidm: serving on {service.url} (API docs: {service.url}/docs); "
                  f"data in {service.settings.data_dir}; {access}; Ctrl-C stops", flush=True)
            print(f"cgidm: open {service.url}/ in a browser to run a check", flush=True)
            while True:
                service.check_alive()
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("cgidm: stopping the gateway and the worker", file=sys.stderr, flush=True)
        except (RuntimeError, TimeoutError) as exc:  # a child died or never got ready
            print(f"cgidm: error: {exc} (its log is above); stopping", file=sys.stderr)
            return 1
    return 0
