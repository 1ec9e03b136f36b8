"""A fault-injecting HTTP proxy in front of the S3 server, for the storage fault tests.

The moto server keeps its data in memory, so stopping it would also erase the job records the
tests want to inspect. The worker talks to S3 through this proxy instead, which forwards every
request to the real server unless a rule says to answer ``503 SlowDown`` (an S3 that is up but
erroring) or to drop the connection without answering (an S3 that went away mid-request).
Everything goes over real sockets; nothing in the code under test is replaced.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-connection", "content-length", "expect"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>injected fault</Message></Error>")


@dataclass
class Rule:
    """Fault the requests ``match`` accepts: ``"503"`` or ``"drop"``, ``times`` times (None:
    until removed)."""

    match: Callable[[str, str], bool]
    action: str = "503"
    times: int | None = None
    hits: int = 0


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FaultProxy:
        proxy = self
        target = urlparse(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                action = proxy._action(self.command, self.path)
                if action == "drop":
                    self.close_connection = True
                    self.connection.close()
                    proxy._log(self.command, self.path, 0)
                    return
                if action == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    proxy._log(self.command, self.path, 503)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in _HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                proxy._log(self.command, self.path, answer.status)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _action(self, method: str, path: str) -> str | None:
        with self.lock:
            for rule in self.rules:
                if rule.match(method, path) and (rule.times is None or rule.hits < rule.times):
                    rule.hits += 1
                    return rule.action
        return None

    def _log(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.requests.append((method, path, status))

    def fail(self, match: Callable[[str, str], bool], action: str = "503",
             times: int | None = None) -> Rule:
        rule = Rule(match, action, times)
        with self.lock:
            self.rules.append(rule)
        return rule

    def heal(self) -> None:
        with self.lock:
            self.rules.clear()


def artifact_puts(method: str, path: str) -> bool:
    """Writes of a job's pictures (``.../attempts/<tag>/artifacts/...``)."""
    return method == "PUT" and "/attempts/" in path
