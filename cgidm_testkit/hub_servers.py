"""Local stand-ins for the Hugging Face Hub and Civitai: real HTTP servers on 127.0.0.1 that
speak the subset of each site's API that ``cgidm.model_fetch`` uses, serving files the tests
build. No internet is needed or reached.

Hugging Face (point ``HF_ENDPOINT`` at :attr:`HubServer.url`):

- ``GET /api/models/{owner}/{name}[/revision/{rev}]``: ``{"id", "sha", "siblings": [{
  "rfilename", "size", "lfs": {"sha256", "size"}}], "cardData": {"base_model"}}``;
- ``GET /api/models/{owner}/{name}/tree/{rev}?recursive=true`` (snapshot_download's listing);
- ``HEAD``/``GET /{owner}/{name}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag`` and
  ``X-Linked-Etag`` (the LFS sha256), ``X-Linked-Size`` and ranged GETs.

Civitai (point ``CGIDM_CIVITAI_URL`` at it):

- ``GET /api/v1/model-versions/{id}`` and ``/api/v1/model-versions/by-hash/{sha256}``;
- ``GET /api/download/models/{id}``: 307 to ``/files/{id}/{name}``, which serves the bytes
  (ranged requests answered 206).

Each Civitai version can misbehave as a test needs (:class:`CivitaiVersion`): demand a token
(401 without, 403 with a wrong one), publish a wrong hash, cut the first or every download
short, answer 429. Every request is logged in :attr:`HubServer.requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class CivitaiVersion:
    data: bytes
    name: str = "suspect.safetensors"
    model_id: int = 1000
    base_model: str = "SD 1.5"
    trained_words: list[str] = field(default_factory=list)
    token: str | None = None           # required Bearer token (401 without, 403 if wrong)
    published_sha256: str | None = None  # default: the real one
    truncate: str | None = None        # "first": the first GET is cut short; "always"
    rate_limited: bool = False         # 429 on the metadata
    extra_files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class HfRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit (main by default)
    base_model: str | None = None
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)  # older commits' files
    listed_sha256: dict[str, str] = field(default_factory=dict)  # a lying file list

    def files_at(self, commit: str) -> dict[str, bytes] | None:
        if commit == self.commit:
            return self.files
        return self.history.get(commit)

    def resolve(self, revision: str) -> str | None:
        if revision in (self.commit, *self.history):
            return revision
        return {"main": self.commit, **self.branches}.get(revision)


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Both sites on one local server (their paths do not overlap)."""

    def __init__(self) -> None:
        self.hf: dict[str, HfRepo] = {}
        self.civitai: dict[int, CivitaiVersion] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._served: dict[int, int] = {}
        server = self
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def downloads(self, prefix: str) -> int:
        """GET requests whose path starts with ``prefix`` (file downloads, typically)."""
        return sum(1 for method, path, _ in self.requests
                   if method == "GET" and path.startswith(prefix))

    def add_civitai_file(self, version_id: int, path: Path, **kwargs: Any) -> CivitaiVersion:
        version = CivitaiVersion(data=Path(path).read_bytes(), name=Path(path).name, **kwargs)
        self.civitai[version_id] = version
        return version

    def add_hf_repo(self, repo_id: str, files: dict[str, bytes], **kwargs: Any) -> HfRepo:
        repo = HfRepo(files=files, **kwargs)
        self.hf[repo_id] = repo
        return repo


def _handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        # -- plumbing ----------------------------------------------------------------------

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, document: Any, headers: dict[str, str] | None = None
                  ) -> None:
            self._send(status, json.dumps(document).encode(), headers)

        def _bytes(self, data: bytes, headers: dict[str, str], cut: bool = False) -> None:
            """The file, honouring ``Range: bytes=N-``; ``cut`` closes the connection halfway."""
            start, status = 0, 200
            match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                if start >= len(data):
                    self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    return
                status = 206
                headers = {**headers,
                           "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            if cut:
                self.wfile.write(body[: max(1, len(body) // 2)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            path = unquote(urlsplit(self.path).path)
            with server._lock:
                server.requests.append((self.command, path, dict(self.headers)))
            if path.startswith("/api/models/"):
                return self._hf_api(path[len("/api/models/"):])
            if path.startswith("/api/v1/model-versions/"):
                return self._civitai_api(path[len("/api/v1/model-versions/"):])
            if path.startswith("/api/download/models/"):
                return self._civitai_download(path[len("/api/download/models/"):])
            if path.startswith("/files/"):
                return self._civitai_file(path[len("/files/"):])
            parts = path.strip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._hf_resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            self._json(404, {"error": "not found"})

        # -- Hugging Face --------------------------------------------------------------------

        def _hf_tree(self, repo: HfRepo, revision: str) -> None:
            """``GET /api/models/{repo}/tree/{rev}?recursive=true`` (what snapshot_download
            lists): every file and folder at the revision."""
            commit = repo.resolve(revision)
            if commit is None:
                return self._json(404, {"error": f"Invalid rev id: {revision}"},
                                  {"X-Error-Code": "RevisionNotFound"})
            files = repo.files_at(commit) or {}
            folders = sorted({"/".join(name.split("/")[:i]) for name in files
                              for i in range(1, name.count("/") + 1)})
            entries: list[dict[str, Any]] = [
                {"type": "directory", "path": f, "oid": _git_sha1(f.encode()), "size": 0}
                for f in folders]
            for name, data in sorted(files.items()):
                entry: dict[str, Any] = {"type": "file", "path": name, "size": len(data),
                                         "oid": _git_sha1(data)}
                if name.endswith(".safetensors"):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                    "pointerSize": 134}
                entries.append(entry)
            self._json(200, entries, {"X-Repo-Commit": commit})

        def _hf_api(self, rest: str) -> None:
            parts = rest.split("/")
            if len(parts) >= 4 and parts[2] == "tree" and "/".join(parts[:2]) in server.hf:
                return self._hf_tree(server.hf["/".join(parts[:2])], "/".join(parts[3:]))
            repo_id, revision = "/".join(parts[:2]), "main"
            if len(parts) >= 4 and parts[2] == "revision":
                revision = "/".join(parts[3:])
            repo = server.hf.get(repo_id)
            if repo is None:
                return self._json(401, {"error": "Repository not found"},
                                  {"X-Error-Code": "RepoNotFound"})
            commit = repo.resolve(revision)
            if commit is None:
                return self._json(404, {"error": f"Invalid rev id: {revision}"},
                                  {"X-Error-Code": "RevisionNotFound"})
            files = repo.files_at(commit) or {}
            siblings = [{"rfilename": name, "size": len(data),
                         "blobId": _git_sha1(data),
                         **({"lfs": {"sha256": repo.listed_sha256.get(
                                         name, hashlib.sha256(data).hexdigest()),
                                     "size": len(data), "pointerSize": 134}}
                            if name.endswith(".safetensors") else {})}
                        for name, data in files.items()]
            document: dict[str, Any] = {"id": repo_id, "modelId": repo_id, "sha": commit,
                                        "siblings": siblings, "private": False,
                                        "tags": [], "downloads": 0, "likes": 0}
            if repo.base_model:
                document["cardData"] = {"base_model": repo.base_model}
            self._json(200, document)

        def _hf_resolve(self, repo_id: str, revision: str, filename: str) -> None:
            repo = server.hf.get(repo_id)
            commit = repo.resolve(revision) if repo else None
            if repo is None or commit is None:
                return self._json(404, {"error": "not found"},
                                  {"X-Error-Code": "RepoNotFound" if repo is None
                                   else "RevisionNotFound"})
            data = (repo.files_at(commit) or {}).get(filename)
            if data is None:
                return self._json(404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            lfs = filename.endswith(".safetensors")
            etag = hashlib.sha256(data).hexdigest() if lfs else _git_sha1(data)
            headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}
            if lfs:
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            self._bytes(data, headers)

        # -- Civitai -------------------------------------------------------------------------

        def _auth_failure(self, version: CivitaiVersion) -> bool:
            if version.token is None:
                return False
            given = self.headers.get("Authorization", "")
            if not given:
                self._json(401, {"error": "Unauthorized: log in or send an API key"})
                return True
            if given != f"Bearer {version.token}":
                self._json(403, {"error": "Forbidden"})
                return True
            return False

        def _version_document(self, version_id: int, version: CivitaiVersion) -> dict[str, Any]:
            base = f"http://{self.headers.get('Host')}"
            sha = (version.published_sha256 or version.sha256).upper()
            files = [*version.extra_files, {
                "id": version_id * 10, "name": version.name, "type": "Model",
                "sizeKB": len(version.data) / 1024,
                "metadata": {"format": "SafeTensor", "fp": "fp32", "size": "full"},
                "pickleScanResult": "Success", "virusScanResult": "Success",
                "hashes": {"SHA256": sha, "AutoV2": sha[:10]},
                "downloadUrl": f"{base}/api/download/models/{version_id}", "primary": True}]
            return {"id": version_id, "modelId": version.model_id, "name": "v1",
                    "baseModel": version.base_model, "trainedWords": version.trained_words,
                    "air": f"urn:air:sd1:lora:civitai:{version.model_id}@{version_id}",
                    "model": {"name": "suspect", "type": "LORA"}, "files": files,
                    "downloadUrl": f"{base}/api/download/models/{version_id}"}

        def _civitai_api(self, rest: str) -> None:
            if rest.startswith("by-hash/"):
                wanted = rest[len("by-hash/"):].lower()
                for version_id, version in server.civitai.items():
                    if version.sha256 == wanted:
                        return self._json(200, self._version_document(version_id, version))
                return self._json(404, {"error": "Model not found"})
            if not rest.isdigit() or int(rest) not in server.civitai:
                return self._json(404, {"error": f"No model version with id {rest}"})
            version = server.civitai[int(rest)]
            if version.rate_limited:
                return self._json(429, {"error": "Too many requests"}, {"Retry-After": "30"})
            if self._auth_failure(version):
                return
            self._json(200, self._version_document(int(rest), version))

        def _civitai_download(self, rest: str) -> None:
            if not rest.isdigit() or int(rest) not in server.civitai:
                return self._json(404, {"error": "not found"})
            version = server.civitai[int(rest)]
            if self._auth_failure(version):
                return
            self._send(307, b"", {"Location": f"/files/{rest}/{version.name}"})

        def _civitai_file(self, rest: str) -> None:
            version_id = rest.split("/", 1)[0]
            version = server.civitai.get(int(version_id)) if version_id.isdigit() else None
            if version is None:
                return self._json(404, {"error": "not found"})
            with server._lock:
                served = server._served.get(int(version_id), 0)
                server._served[int(version_id)] = served + 1
            cut = version.truncate == "always" or (version.truncate == "first" and served == 0)
            self._bytes(version.data, {"Content-Disposition":
                                       f'attachment; filename="{version.name}"'}, cut=cut)

    return Handler
