"""Who is calling: API keys, job ownership and signed artifact URLs.

Keys are bearer tokens (``Authorization: Bearer <key>``). The operator configures only their
SHA-256 hashes (``CGIDM_API_KEYS=name:<hex>,...``), so no settings file, environment listing or
log ever holds a usable key; a presented key is hashed and compared with every configured hash
in constant time (``hmac.compare_digest``). A job belongs to the key NAME that submitted it
(``owner`` in the record); another key asking for it gets the same 404 as for a job that does
not exist, so job ids reveal nothing.

Without keys the gateway is in *local mode*: it answers only clients on the loopback interface
(the embedded ``cgidm serve`` on 127.0.0.1), and refuses everyone else with 403. Behind a
reverse proxy, uvicorn's proxy headers make the real client address visible, so a proxy on the
same machine does not turn local mode into open access.

Artifact URLs handed out in job results are *signed* when keys are configured:
``?expires=<unix time>&signature=<HMAC-SHA256>`` over the job, picture, expiry and owner. Such
a URL works without the key (for ``<img>`` tags and sharing with one's lawyer) until it
expires (``CGIDM_ARTIFACT_URL_TTL``), and only for that picture; the owner's key works too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from app.errors import ApiError
from cgidm.settings import Settings, is_loopback_host

BEARER = re.compile(r"^Bearer[ \t]+([A-Za-z0-9._~+/=-]{1,512})[ \t]*$", re.IGNORECASE)
_CHALLENGE = 'Bearer realm="cgidm"'


@dataclass(frozen=True)
class Caller:
    """The key name of the caller; ``None`` in local mode (no keys configured)."""

    name: str | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _unauthorized(msg: str, error: str = "invalid_request") -> ApiError:
    return ApiError(401, ["header", "authorization"], "unauthorized", msg,
                    headers={"WWW-Authenticate": f'{_CHALLENGE}, error="{error}"'
                             if error != "invalid_request" else _CHALLENGE})


def key_name(settings: Settings, header: str | None) -> str:
    """The configured name of the key in an ``Authorization`` header, or a 401."""
    if not header:
        raise _unauthorized("this service needs an API key: send 'Authorization: Bearer <key>' "
                            "(the operator creates keys with `cgidm keys new NAME`)")
    match = BEARER.match(header)
    if match is None:
        raise _unauthorized("malformed Authorization header; send 'Authorization: Bearer <key>'",
                            "invalid_token")
    digest = hash_key(match.group(1))
    found: str | None = None
    for name, expected in settings.api_key_hashes.items():  # every hash, found or not
        if hmac.compare_digest(digest, expected):
            found = name
    if found is None:
        raise _unauthorized("unknown or revoked API key", "invalid_token")
    return found


def local_only(request: Request) -> None:
    host = request.client.host if request.client else None
    if not is_loopback_host(host):
        raise ApiError(403, [], "local_mode",
                       "this service has no API keys configured (CGIDM_API_KEYS) and answers "
                       "only requests from its own machine; ask the operator for a key")


def caller_of(settings: Settings, request: Request) -> Caller:
    if not settings.api_key_hashes:
        local_only(request)
        return Caller(None)
    return Caller(key_name(settings, request.headers.get("authorization")))


def get_caller(request: Request) -> Caller:
    """FastAPI dependency: the authenticated caller of this request."""
    return caller_of(request.app.state.services.settings, request)


#: A route's parameter ``caller: CallerDep`` receives the authenticated :class:`Caller` (or the
#: request is refused with 401 before the route runs).
CallerDep = Annotated[Caller, Depends(get_caller)]


# ------------------------------------------------------------------------------------------
# signed artifact URLs


class UrlSigner:
    """HMAC-signed, expiring artifact URLs bound to the job's owner."""

    def __init__(self, settings: Settings):
        secret = settings.url_signing_key
        if secret is None:
            # Every replica with the same keys derives the same secret; changing the keys
            # (revoking one) invalidates every URL handed out before.
            material = ",".join(f"{n}:{h}" for n, h in sorted(settings.api_key_hashes.items()))
            secret = hashlib.sha256(b"cgidm artifact urls\0" + material.encode()).hexdigest()
        self._secret = secret.encode()
        self.ttl = settings.artifact_url_ttl
        self.enabled = bool(settings.api_key_hashes)

    def _mac(self, path: str, expires: int, owner: str | None) -> str:
        message = f"{path}\n{expires}\n{owner or ''}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def sign(self, path: str, owner: str | None, now: float | None = None) -> str:
        if not self.enabled:
            return path
        # Rounded up to the minute, so repeated polls hand out the same URL (browser caches).
        expires = (int((now or time.time()) + self.ttl) // 60 + 1) * 60
        return f"{path}?expires={expires}&signature={self._mac(path, expires, owner)}"

    def verify(self, path: str, owner: str | None, expires: str, signature: str) -> None:
        invalid = ApiError(401, ["query", "signature"], "invalid_signature",
                           "this artifact link is invalid or has expired; GET the job again for "
                           "fresh links, or send the API key",
                           headers={"WWW-Authenticate": _CHALLENGE})
        if not expires.isdigit() or len(expires) > 12:
            raise invalid
        if not hmac.compare_digest(self._mac(path, int(expires), owner), signature):
            raise invalid
        if int(expires) < time.time():
            raise invalid


# ------------------------------------------------------------------------------------------
# logs


class RedactSignatures(logging.Filter):
    """Keep artifact signatures out of access logs: a log reader could otherwise replay a link
    until it expires. (Keys never reach the logs: uvicorn does not log headers.)"""

    _PATTERN = re.compile(r"(signature=)[^&\s\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(self._PATTERN.sub(r"\1[redacted]", a) if isinstance(a, str)
                                else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = self._PATTERN.sub(r"\1[redacted]", record.msg)
        return True


def install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSignatures) for f in logger.filters):
            logger.addFilter(RedactSignatures())


def describe_mode(settings: Settings) -> str:
    keys: dict[str, Any] = settings.api_key_hashes
    if keys:
        return f"API keys required ({len(keys)} configured: {', '.join(sorted(keys))})"
    return ("no API keys configured (CGIDM_API_KEYS): local mode, answering requests from this "
            "machine only")
