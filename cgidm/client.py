"""A Python client for the cgidm service, so that nobody writes HTTP by hand.

    from cgidm.client import CgidmClient

    with CgidmClient("https://cgidm.example.org", key="...") as service:
        model = service.upload_model("suspect.safetensors", finetuned_from="sd15")
        job = service.check("sd15", model["id"], ["art1.png", "art2.png"],
                            controls=["unreleased.png"], steps=100)
        for row in job["result"]["images"]:
            print(row["name"], row["score"], row["verdict"])

It needs only httpx (no torch): ``cgidm submit`` is built on it. Every failure is a
:class:`ServiceError` with one readable line (the service's own message for 4xx answers); a full
queue (429) is retried after the ``Retry-After`` the service sends.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from cgidm.errors import CgidmServiceError
from cgidm_core.names import ARTIFACT_KINDS, STORED_KINDS

TERMINAL = ("succeeded", "failed", "cancelled")
ARTIFACTS = ARTIFACT_KINDS  # the pictures of one image, as the service names them


def _check_reference(finetuned: str) -> None:
    """A hub reference (hf:..., civitai:..., a model page URL) goes to the service as written,
    and the service's worker fetches it; a malformed one is refused here, before the images are
    sent, with the same message the service would give."""
    from cgidm.model_refs import ModelReferenceError, looks_like_reference, parse_reference

    if looks_like_reference(finetuned):
        try:
            parse_reference(finetuned)
        except ModelReferenceError as exc:
            raise ServiceError(str(exc), code="invalid_model_reference") from None


class ServiceError(CgidmServiceError):
    """The service refused or failed a request (``status`` is the HTTP status, 0 when it
    could not be reached), or a job did not succeed."""

    def __init__(self, message: str, status: int = 0, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code or "service_error"


def _explain(response: httpx.Response) -> ServiceError:
    code, message = None, response.text[:300]
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        item = response.json()["detail"][0]
        code, message = item.get("type"), item.get("msg", message)
    hint = {401: "the API key is missing or not accepted (--key or CGIDM_API_KEY)",
            403: "the service refuses this client", 404: "not found (or not yours)",
            413: "too large for this service", 429: "the queue is full"}.get(response.status_code)
    prefix = f"{response.request.method} {response.request.url.path}: {response.status_code}"
    text = f"{prefix} {code}: {message}" if code else f"{prefix}: {message}"
    if hint and hint not in text:
        text += f" ({hint})"
    return ServiceError(text, response.status_code, code)


class CgidmClient:
    """One service and API key. ``busy_retries`` is how often a 429 is retried (after the
    service's ``Retry-After``, at most ``max_wait`` seconds each)."""

    def __init__(self, url: str, key: str | None = None, *, timeout: float = 120.0,
                 busy_retries: int = 10, max_wait: float = 300.0,
                 sleep: Callable[[float], None] = time.sleep):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=10.0))
        self.busy_retries, self.max_wait, self.sleep = busy_retries, max_wait, sleep

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> CgidmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, ok: Sequence[int] = (200,),
                 body: Callable[[], dict[str, Any]] | None = None) -> httpx.Response:
        """One request, retried on 429; ``body()`` builds fresh arguments (files are reopened)
        for every attempt."""
        for attempt in range(self.busy_retries + 1):
            with contextlib.ExitStack() as stack:
                kwargs = body() if body else {}
                for handle in kwargs.pop("_close", []):
                    stack.callback(handle.close)
                try:
                    response = self.http.request(method, path, **kwargs)
                except httpx.HTTPError as exc:
                    raise ServiceError(f"cannot reach the service at {self.url}: "
                                       f"{type(exc).__name__}: {exc}") from exc
            if response.status_code == 429 and attempt < self.busy_retries:
                wait = response.headers.get("retry-after", "5")
                self.sleep(min(float(wait) if wait.isdigit() else 5.0, self.max_wait))
                continue
            if response.status_code not in ok:
                raise _explain(response)
            return response
        raise AssertionError("unreachable")

    # -- models --------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The registry's models and your uploads."""
        return self._request("GET", "/models").json()["models"]

    def upload_model(self, path: str | Path, finetuned_from: str, *, name: str | None = None,
                     kind: str | None = None, prompt: str | None = None) -> dict[str, Any]:
        """Upload a .safetensors file (streamed from disk); the same file again gives the same
        model."""
        path = Path(path)
        if not path.is_file():
            raise ServiceError(f"{path}: no such model file")
        fields = {k: v for k, v in {"finetuned_from": finetuned_from, "name": name,
                                    "kind": kind, "prompt": prompt}.items() if v is not None}

        def body() -> dict[str, Any]:
            handle = path.open("rb")
            return {"data": fields, "files": {"file": (path.name, handle)}, "_close": [handle]}

        return self._request("POST", "/models", ok=(200, 201), body=body).json()

    def delete_model(self, model_id: str) -> None:
        self._request("DELETE", f"/models/{model_id}", ok=(204,))

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, pretrained: str, finetuned: str, images: Sequence[str | Path],
               controls: Sequence[str | Path] = (), **settings: Any) -> dict[str, Any]:
        """Enqueue a job; ``settings`` are the job's method settings (steps, seed, prompt,
        metric, batch_size, ...). Returns the 202 answer (job_id, status_url, warnings)."""
        if not images:
            raise ServiceError("no images to submit")
        _check_reference(finetuned)
        fields = {"pretrained": pretrained, "finetuned": finetuned}
        fields.update({k: str(v).lower() if isinstance(v, bool) else str(v)
                       for k, v in settings.items() if v is not None})

        def body() -> dict[str, Any]:
            handles, files = [], []
            for field, paths in (("images", images), ("controls", controls)):
                for item in paths:
                    handle = Path(item).open("rb")  # noqa: SIM115 - closed by _request
                    handles.append(handle)
                    files.append((field, (Path(item).name, handle)))
            return {"data": fields, "files": files, "_close": handles}

        return self._request("POST", "/authenticate", ok=(202,), body=body).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/jobs/{job_id}", ok=(200, 202)).json()

    def wait(self, job_id: str, *, poll: float = 1.0, timeout: float | None = None,
             progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job ends; ``progress(job)`` sees every poll. Raises ServiceError
        unless it succeeded."""
        return self._wait_until_done("job", job_id, self.job, poll, timeout, progress)

    def _wait_until_done(self, what: str, ident: str, fetch: Callable[[str], dict[str, Any]],
                         poll: float, timeout: float | None,
                         progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        """Poll ``fetch(ident)`` (a job or an audit: the same status words) until it ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = fetch(ident)
            if progress is not None:
                progress(state)
            if state["status"] in TERMINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(f"{what} {ident} did not finish within {timeout:.0f} s "
                                   "(still running on the service)")
            self.sleep(poll)
        if state["status"] != "succeeded":
            error = state.get("error") or {}
            raise ServiceError(f"{what} {ident} {state['status']}: {error.get('code')}: "
                               f"{error.get('message')}", code=error.get("code"))
        return state

    def artifacts(self, result: dict[str, Any]) -> Iterator[tuple[str, str, bytes]]:
        """(image name, picture kind, PNG bytes) of every picture of a result."""
        for row in [*result["images"], *result.get("controls", [])]:
            for kind in STORED_KINDS:
                if not row["artifacts"].get(kind):  # the base recovery, when not computed
                    continue
                data = self._request("GET", row["artifacts"][kind]).content
                yield row["name"], kind, data

    def check(self, pretrained: str, finetuned: str, images: Sequence[str | Path],
              controls: Sequence[str | Path] = (), *, timeout: float | None = None,
              **settings: Any) -> dict[str, Any]:
        """Submit and wait: the finished job (its ``result`` holds the evidence)."""
        accepted = self.submit(pretrained, finetuned, images, controls, **settings)
        return self.wait(accepted["job_id"], timeout=timeout)

    # -- audits --------------------------------------------------------------------------------

    def submit_audit(self, models: Sequence[dict[str, Any]], images: Sequence[str | Path],
                     controls: Sequence[str | Path], *, fdr: float = 0.05,
                     family_wise: str | None = None, **settings: Any) -> dict[str, Any]:
        """Enqueue an audit of ``images`` against every model of ``models`` (``{"pretrained",
        "finetuned", "prompt"?}`` each). Returns the 202 answer (audit_id, status_url)."""
        if not images or not controls:
            raise ServiceError("an audit needs images and known non-member controls")
        fields = {"models": json.dumps(list(models)), "fdr": str(fdr)}
        if family_wise:
            fields["family_wise"] = family_wise
        fields.update({k: str(v) for k, v in settings.items() if v is not None})

        def body() -> dict[str, Any]:
            handles, files = [], []
            for field, paths in (("images", images), ("controls", controls)):
                for item in paths:
                    handle = Path(item).open("rb")  # noqa: SIM115 - closed by _request
                    handles.append(handle)
                    files.append((field, (Path(item).name, handle)))
            return {"data": fields, "files": files, "_close": handles}

        return self._request("POST", "/audits", ok=(202,), body=body).json()

    def audit(self, audit_id: str) -> dict[str, Any]:
        return self._request("GET", f"/audits/{audit_id}").json()

    def cancel_audit(self, audit_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/audits/{audit_id}", ok=(202,)).json()

    def wait_audit(self, audit_id: str, *, poll: float = 1.0, timeout: float | None = None,
                   progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the audit ends; raises ServiceError unless it succeeded."""
        return self._wait_until_done("audit", audit_id, self.audit, poll, timeout, progress)
