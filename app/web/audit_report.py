"""The audit report: one document per audit (templates/audit_report.html), as HTML and as PDF.

The gateway renders it for ``GET /audits/{id}/report.pdf`` and ``/report.html`` from the stored,
signed result and pictures; ``cgidm report`` renders it from an audit output folder (``cgidm
audit --out`` or ``cgidm submit-audit --out``). It shares the check report's stylesheet, filters,
signature facts and PDF printer (report_document.py), so both documents look and print alike.

What it asserts, and nothing more than the signed audit holds: how many models were flagged at
which error level and correction, the ranked table, the evidence pictures of each flagged model
(each checked against its signed sha256), and how the audit was run (decision, settings, seed,
software, signature key id and digest). Torch-free: nothing is re-run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2

from app.web import report_document
from cgidm.audit_signing import LocalAudit
from cgidm.result_signing import SIGNATURE_FIELD

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(report_document.TEMPLATES)),
                          autoescape=jinja2.select_autoescape(["html"]))
report_document.install_filters(_env)

#: Image pictures shown per flagged model (the most member-like first), and the kind shown.
PICTURES_PER_MODEL = 8
SHOWN_KIND = "side_by_side"
CORRECTION_NAMES = {"bh": "Benjamini-Hochberg (false discovery rate)",
                    "holm": "Holm (family-wise error rate)",
                    "bonferroni": "Bonferroni (family-wise error rate)"}


@dataclass
class FlaggedModel:
    """One flagged model's evidence page: its row and its pictures (data URIs) with notes."""

    model: dict[str, Any]
    pictures: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AuditReport:
    """Everything the template needs."""

    document: dict[str, Any]
    title_facts: list[tuple[str, str]]
    finding: str
    signature: report_document.SignatureFacts
    flagged: list[FlaggedModel]
    verify_command: str
    generated: datetime = field(default_factory=lambda: datetime.now().astimezone())


def finding_sentence(document: dict[str, Any]) -> str:
    """The finding in plain words: how many models, at which level, under which correction."""
    decision = document.get("decision") or {}
    counts = document.get("counts") or {}
    correction = str(decision.get("correction") or "bh")
    rate = "false discovery rate" if correction == "bh" else "family-wise error rate"
    level = decision.get("level")
    total, flagged = counts.get("models", 0), counts.get("flagged", 0)
    names = [m.get("finetuned") for m in document.get("models") or [] if m.get("flagged")]
    which = f": {', '.join(str(n) for n in names)}" if names else ""
    return (f"{flagged} of {total} suspect model{'s' if total != 1 else ''} "
            f"{'was' if flagged == 1 else 'were'} flagged as trained on these images at a "
            f"{rate} of {level} ({CORRECTION_NAMES.get(correction, correction)} correction "
            f"across the models){which}.")


def picture_note(model: dict[str, Any], name: str, data: bytes) -> str:
    signed = ((model.get("picture_sha256") or {}).get(name) or {}).get(SHOWN_KIND)
    if signed is None:
        return "This audit records no hash of this picture."
    if hashlib.sha256(data).hexdigest() != signed:
        return ("WARNING: this picture differs from the one the signed audit names (its sha256 "
                "does not match).")
    return "This picture has the sha256 recorded in the signed audit."


def flagged_models(document: dict[str, Any],
                   pictures: dict[int, dict[str, bytes]]) -> list[FlaggedModel]:
    """Each flagged model with the side-by-side pictures of its most member-like images
    (``pictures``: model index -> image name -> PNG bytes, those at hand)."""
    out = []
    for model in document.get("models") or []:
        if not model.get("flagged"):
            continue
        rows = sorted(model.get("images") or [],
                      key=lambda r: -(r.get("evidence_score") or 0.0))[:PICTURES_PER_MODEL]
        at_hand = pictures.get(int(model.get("index", -1)), {})
        shown = [{"name": r["name"], "p_value": r.get("p_value"),
                  "evidence_score": r.get("evidence_score"),
                  "src": report_document.data_uri(at_hand[r["name"]]),
                  "note": picture_note(model, r["name"], at_hand[r["name"]])}
                 for r in rows if r.get("name") in at_hand]
        out.append(FlaggedModel(model, shown))
    return out


def build_report(document: dict[str, Any], pictures: dict[int, dict[str, bytes]],
                 title_facts: list[tuple[str, str]], public_keys: dict[str, Any] | None,
                 audit_name: str) -> AuditReport:
    return AuditReport(
        document, title_facts, finding_sentence(document),
        report_document.signature_facts(document, public_keys),
        flagged_models(document, pictures),
        f"cgidm verify-audit {audit_name} --public-key cgidm-signing-keys.json")


def render_html(report: AuditReport) -> str:
    document = report.document
    return _env.get_template("audit_report.html").render(
        r=report, doc=document, decision=document.get("decision") or {},
        counts=document.get("counts") or {}, css=report_document.stylesheet(),
        signature_field=SIGNATURE_FIELD, correction_names=CORRECTION_NAMES)


def local_pictures(local: LocalAudit) -> dict[int, dict[str, bytes]]:
    """The side-by-side pictures of the flagged models found beside audit.json."""
    out: dict[int, dict[str, bytes]] = {}
    for model in local.document.get("models") or []:
        if not model.get("flagged"):
            continue
        found = {}
        for row in model.get("images") or []:
            path = local.picture_path(model, str(row.get("name")), SHOWN_KIND)
            if path is not None:
                found[str(row["name"])] = path.read_bytes()
        out[int(model.get("index", -1))] = found
    return out
