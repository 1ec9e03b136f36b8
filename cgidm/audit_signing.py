"""Signed audit documents: an audit's ranked result signed like a check's result.

``cgidm audit`` (audit.json) and the service (``audits/<id>/result.json``, what ``GET
/audits/{id}`` returns as ``result``) sign the ranked, decided audit with the same machinery as a
check (cgidm/result_signing.py: RFC 8785 canonical JSON, Ed25519, the same key files), so one
public key set verifies both. The evidence pictures of the flagged models are covered through
their hashes (``picture_sha256`` of each flagged model: image name -> kind -> sha256), as a
check's pictures are.

This module finds the signed document in the files people hold (an ``cgidm audit`` output
folder, its audit.json, or the audit document ``cgidm submit-audit`` saved, which wraps the
service's signed ``result``) and the pictures beside it. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgidm.errors import CgidmServiceError
from cgidm.result_signing import file_sha256

SIGNER_CLI = "cgidm audit"
SIGNER_SERVICE = "cgidm service"
AUDIT_FILE = "audit.json"


class AuditFileError(CgidmServiceError, ValueError):
    """The given path is not an audit cgidm made; the message says what was expected."""

    code = "bad_audit_file"


def is_audit_document(document: Any) -> bool:
    """An audit's ranked result (it has ``models`` and their ``decision``), or a saved
    ``GET /audits/{id}`` document wrapping one."""
    if not isinstance(document, dict):
        return False
    if isinstance(document.get("result"), dict):
        document = document["result"]
    return isinstance(document.get("models"), list) and isinstance(document.get("decision"), dict)


def picture_hashes(pictures: dict[str, dict[str, bytes]]) -> dict[str, dict[str, str]]:
    """image name -> kind -> sha256 hex of the PNG bytes: what the signature covers."""
    return {name: {kind: hashlib.sha256(data).hexdigest() for kind, data in kinds.items()}
            for name, kinds in pictures.items()}


@dataclass
class LocalAudit:
    """A signed audit document as found on disk, and where its pictures are."""

    document: dict[str, Any]  # the signed document (the service's ``result``, unwrapped)
    path: Path
    folder: Path
    audit_id: str | None

    def picture_path(self, model: dict[str, Any], name: str, kind: str) -> Path | None:
        """The local file of one evidence picture: the relative path ``cgidm audit`` recorded,
        or where ``cgidm submit-audit`` saved a served one (``models/NNN/<name>.<kind>.png``)."""
        recorded = ((model.get("pictures") or {}).get(name) or {}).get(kind)
        if isinstance(recorded, str) and not recorded.startswith("/") and ".." not in recorded:
            path = self.folder / recorded
        else:
            path = self.folder / "models" / f"{int(model.get('index', 0)):03d}" / \
                f"{name}.{kind}.png"
        return path if path.is_file() else None


def load_local_audit(path: Path) -> LocalAudit:
    """An audit output folder, its audit.json, or a saved ``GET /audits/{id}`` document."""
    if path.is_dir():
        path = path / AUDIT_FILE
        if not path.is_file():
            raise AuditFileError(f"{path.parent}: no {AUDIT_FILE} in this folder (cgidm audit "
                                 "--out and cgidm submit-audit --out write one)")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditFileError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not is_audit_document(document):
        raise AuditFileError(f"{path} is not a cgidm audit (no ranked 'models' and 'decision')")
    audit_id = document.get("audit_id")
    if isinstance(document.get("result"), dict):
        document = document["result"]
    return LocalAudit(document, path, path.parent,
                      str(document.get("audit_id") or audit_id or "") or None)


def picture_problems(local: LocalAudit) -> list[str]:
    """Pictures at hand whose sha256 differs from the signed one (missing ones are not
    problems: a signature check needs only the document)."""
    problems = []
    for model in local.document.get("models") or []:
        if not isinstance(model, dict):
            continue
        for name, kinds in (model.get("picture_sha256") or {}).items():
            for kind, digest in (kinds or {}).items():
                found = local.picture_path(model, name, kind)
                if found is not None and file_sha256(found) != digest:
                    problems.append(f"{found.name} (the {kind.replace('_', ' ')} picture of "
                                    f"{name!r} for {model.get('finetuned')}) differs from its "
                                    "signed sha256")
    return problems
