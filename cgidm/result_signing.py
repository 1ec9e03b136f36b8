"""Ed25519 signatures on result documents: proof that a result came from this service unaltered.

What is signed. The signature is a block inside the result itself (``"signature": {...}``), not a
sidecar file: a result travels as one file (``cgidm submit`` saves it, ``GET /jobs/{id}`` returns
it inside the job, people mail it), and a sidecar would be lost on the way. The block signs the
SHA-256 digest of the canonical JSON (RFC 8785, the ``rfc8785`` package) of everything else in
the document, less the per-image ``artifacts`` links of a service result: those are delivery
addresses that the gateway rewrites into expiring signed URLs, not evidence. The pictures
themselves are covered by their hashes (``picture_sha256`` in each image's row). Canonical JSON
makes the signature independent of indentation and key order, so re-formatting a file keeps it
valid, while any change of a value, key or array order breaks it.

What is checked, in this order (``check_signature``):

1. no block: *not signed*;
2. the block names a key the verifier was not given, or its signature does not verify with that
   key over the digest it records: *not signed by this service*;
3. the signature is genuine but the document's digest now differs from the signed one: *edited
   after signing*.

The signed message is ``cgidm-result-v1:<sha256 hex>``: the digest printed in the report is
exactly what the key signed. Key ids (the first 16 hex characters of the SHA-256 of the raw
public key) let a service rotate keys: retired public keys stay in the published key set, so
old results still verify.

Torch-free: the gateway serves the public keys, ``cgidm verify`` checks before it re-runs.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cgidm.errors import CgidmServiceError

SCHEME = "cgidm-result-v1"
ALGORITHM = "Ed25519"
SIGNATURE_FIELD = "signature"
#: Where ``cgidm check`` and ``cgidm keys`` keep the local key unless CGIDM_SIGNING_KEY names one.
KEY_ENV = "CGIDM_SIGNING_KEY"
KEY_FILE = "signing-key.pem"
#: The path of the published key set on the gateway.
WELL_KNOWN_PATH = "/.well-known/cgidm-signing-keys.json"

# outcomes of check_signature
VALID = "valid"
UNSIGNED = "unsigned"
NOT_OURS = "not_signed_by_this_service"
EDITED = "edited_after_signing"


class SigningKeyError(CgidmServiceError, ValueError):
    """A key file cannot be read or made; the message says which file and what to do."""

    code, http_status = "signing_key", 503


# ------------------------------------------------------------------------------------------
# canonical content


def signed_content(document: dict[str, Any]) -> dict[str, Any]:
    """The part of a result the signature covers: all but the signature block and the
    per-image ``artifacts`` links (delivery URLs the gateway signs and expires)."""
    content = {k: v for k, v in document.items() if k != SIGNATURE_FIELD}
    for section in ("images", "controls"):
        rows = content.get(section)
        if isinstance(rows, list):
            content[section] = [{k: v for k, v in row.items() if k != "artifacts"}
                                if isinstance(row, dict) else row for row in rows]
    return content


def canonical_bytes(document: dict[str, Any]) -> bytes:
    """RFC 8785 canonical JSON of the signed content (raises ValueError on NaN/infinity)."""
    try:
        return rfc8785.dumps(signed_content(document))
    except (rfc8785.CanonicalizationError, TypeError) as exc:
        raise ValueError(f"the result cannot be canonicalised for signing: {exc}") from exc


def content_digest(document: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical signed content."""
    return hashlib.sha256(canonical_bytes(document)).hexdigest()


def _message(digest: str) -> bytes:
    return f"{SCHEME}:{digest}".encode("ascii")


# ------------------------------------------------------------------------------------------
# keys


def key_id_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    """A private key and where it came from."""

    private: Ed25519PrivateKey
    path: Path

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public)


def default_key_path() -> Path:
    """CGIDM_SIGNING_KEY, else the user's config folder (``~/.config/cgidm/signing-key.pem``)."""
    configured = os.environ.get(KEY_ENV)
    if configured:
        return Path(configured).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "cgidm" / KEY_FILE


def retired_dir(path: Path) -> Path:
    """Public keys of rotated-out keys, still published so old results verify."""
    return path.with_name(path.name + ".retired")


def _read_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"signing key {path}: cannot read it as an unencrypted PEM private "
                              f"key ({exc}); point CGIDM_SIGNING_KEY at the key file, or move "
                              "this file away to make a new key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {path}: an Ed25519 key is needed, this is a "
                              f"{type(key).__name__}")
    return key


def _pem(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def load_or_create_key(path: Path | None = None) -> SigningKey:
    """The key at ``path`` (default: ``default_key_path()``), made on first use.

    Made atomically (written aside, then hard-linked into place, which fails if another process
    made it first), so a gateway and a worker starting together end up with one key.
    """
    path = Path(path) if path is not None else default_key_path()
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(_pem(Ed25519PrivateKey.generate()))
            try:
                os.link(fresh, path)
            except FileExistsError:
                pass  # another process made it: use theirs
            finally:
                fresh.unlink()
        except OSError as exc:
            raise SigningKeyError(f"cannot make the signing key {path} ({exc}); set CGIDM_"
                                  "SIGNING_KEY to a writable path or an existing key") from exc
    return SigningKey(_read_private(path), path)


def rotate_key(path: Path | None = None) -> tuple[SigningKey, str | None]:
    """Replace the key with a new one; the old public key moves to ``<key>.retired/`` so it stays
    in the published set. Returns (new key, retired key id or None)."""
    path = Path(path) if path is not None else default_key_path()
    retired_id = None
    if path.exists():
        old = SigningKey(_read_private(path), path)
        retired_id = old.key_id
        folder = retired_dir(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{retired_id}.pub.pem").write_bytes(public_pem(old.public))
        path.unlink()
    return load_or_create_key(path), retired_id


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def _entry(public: Ed25519PublicKey, status: str) -> dict[str, str]:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"key_id": key_id_of(public), "algorithm": ALGORITHM, "status": status,
            "public_key": base64.b64encode(raw).decode("ascii"),
            "pem": public_pem(public).decode("ascii")}


def key_set(key: SigningKey, extra_public: list[Path] | tuple[Path, ...] = ()) -> dict[str, Any]:
    """The published key set: the current key, the retired ones beside it and any extra public
    key files (CGIDM_SIGNING_PUBLIC_KEYS)."""
    keys = [_entry(key.public, "current")]
    seen = {key.key_id}
    files = sorted(retired_dir(key.path).glob("*.pem")) if retired_dir(key.path).is_dir() else []
    for file in [*files, *extra_public]:
        for public in read_public_keys(Path(file)).values():
            if key_id_of(public) not in seen:
                seen.add(key_id_of(public))
                keys.append(_entry(public, "retired"))
    return {"scheme": SCHEME, "keys": keys}


def keys_of_set(document: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
    """{key id: public key} of a key set document (``key_set``'s shape). The id is computed from
    the key, never taken from the document."""
    found = [Ed25519PublicKey.from_public_bytes(base64.b64decode(entry["public_key"]))
             for entry in document.get("keys", [])]
    return {key_id_of(p): p for p in found}


def read_public_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """{key id: public key} from a PEM public key, a PEM private key (its public half) or a key
    set JSON (``cgidm keys public`` output, the gateway's well-known URL)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"public key {path}: cannot read it ({exc})") from exc
    found: list[Ed25519PublicKey] = []
    text = data.strip()
    if text.startswith(b"{"):
        try:
            found.extend(keys_of_set(json.loads(text)).values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SigningKeyError(f"public key {path}: not a cgidm key set ({exc})") from exc
    elif b"PRIVATE KEY" in text:
        found.append(_read_private(path).public_key())
    else:
        try:
            public = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise SigningKeyError(f"public key {path}: not a PEM public key or cgidm key set "
                                  f"({exc})") from exc
        if not isinstance(public, Ed25519PublicKey):
            raise SigningKeyError(f"public key {path}: an Ed25519 key is needed")
        found.append(public)
    if not found:
        raise SigningKeyError(f"public key {path}: the key set holds no keys")
    return {key_id_of(p): p for p in found}


# ------------------------------------------------------------------------------------------
# signing and checking


def sign_document(document: dict[str, Any], key: SigningKey, signer: str) -> dict[str, Any]:
    """A copy of ``document`` with its signature block (replacing any earlier one)."""
    digest = content_digest(document)
    block = {
        "scheme": SCHEME,
        "algorithm": ALGORITHM,
        "key_id": key.key_id,
        "signer": signer,
        "digest": f"sha256:{digest}",
        "value": base64.b64encode(key.private.sign(_message(digest))).decode("ascii"),
        "covers": "RFC 8785 canonical JSON of the document without 'signature' and without "
                  "each image's 'artifacts' links",
    }
    signed = copy.copy(document)
    signed.pop(SIGNATURE_FIELD, None)
    signed[SIGNATURE_FIELD] = block
    return signed


@dataclass(frozen=True)
class SignatureCheck:
    outcome: str  # VALID, UNSIGNED, NOT_OURS or EDITED
    message: str
    key_id: str | None = None
    signed_digest: str | None = None
    digest: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == VALID


def check_signature(document: dict[str, Any],
                    public_keys: dict[str, Ed25519PublicKey]) -> SignatureCheck:
    """Whether ``document`` carries a genuine signature by one of ``public_keys`` over its
    present content (see the module docstring for the order of the checks)."""
    block = document.get(SIGNATURE_FIELD)
    try:
        digest = content_digest(document)
    except ValueError as exc:
        return SignatureCheck(EDITED, f"the document is not valid signed JSON: {exc}")
    if not isinstance(block, dict):
        return SignatureCheck(UNSIGNED, "the result carries no signature", digest=digest)
    key_id = block.get("key_id")
    recorded = str(block.get("digest") or "")
    if block.get("scheme") != SCHEME or block.get("algorithm") != ALGORITHM or \
            not recorded.startswith("sha256:"):
        return SignatureCheck(NOT_OURS, f"the signature block is not a {SCHEME} Ed25519 "
                              "signature", key_id=key_id, digest=digest)
    public = public_keys.get(str(key_id))
    if public is None:
        known = ", ".join(sorted(public_keys)) or "none"
        return SignatureCheck(NOT_OURS, f"signed with key {key_id}, which is not among the "
                              f"public keys given (key ids: {known})", key_id=key_id,
                              signed_digest=recorded, digest=digest)
    try:
        public.verify(base64.b64decode(str(block.get("value", "")), validate=True),
                      _message(recorded.removeprefix("sha256:")))
    except (InvalidSignature, ValueError):
        return SignatureCheck(NOT_OURS, f"the signature does not verify with key {key_id}",
                              key_id=key_id, signed_digest=recorded, digest=digest)
    if recorded != f"sha256:{digest}":
        return SignatureCheck(EDITED, f"genuinely signed with key {key_id} over {recorded}, "
                              f"but the content now has sha256:{digest}", key_id=key_id,
                              signed_digest=recorded, digest=digest)
    return SignatureCheck(VALID, f"signed with key {key_id}, content unchanged "
                          f"(sha256:{digest})", key_id=key_id, signed_digest=recorded,
                          digest=digest)


def file_sha256(path: Path) -> str:
    """SHA-256 hex of a file (the pictures a signed result names)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def existing_key(path: Path | None = None) -> SigningKey | None:
    """The key at ``path`` (default: the local one) if it exists; never makes one (a verifier
    checks with the keys it has)."""
    path = Path(path) if path is not None else default_key_path()
    return SigningKey(_read_private(path), path) if path.exists() else None
