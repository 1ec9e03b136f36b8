"""The evidence report: one template (templates/report.html) for the HTML file and the PDF.

The gateway renders it for ``GET /jobs/{id}/report.html`` and ``/report.pdf`` from the stored
result and pictures; ``cgidm report`` renders it from a ``cgidm check`` output folder or a
service ``result.json`` saved by ``cgidm submit``. The PDF is the HTML printed by WeasyPrint, so
the two can never disagree. Torch-free: nothing here runs the method, it only shows a result.

The report states what the result holds and nothing more. Each image page shows the suspect's
recovery (CGI-DM: the contrast of the two models) beside the base model's own recovery of the same
masked input (``cgidm_core.base_recovery``), when the check computed it (the default); for a
result without it (older results, ``--no-base-recovery``) the page says it was not computed
instead of showing a picture that never existed.

Where another kind of result gets its own report (one per audit, once audits exist), the seam is
the three calls the gateway and ``cgidm report`` make: ``evidence.build_result`` (the cards, from
a :class:`JobResult`-shaped result and its pictures), :func:`report_parts` (cover facts, the
signature checked on the stored signed document, method facts) and :func:`render_html` /
:func:`render_pdf`; nothing below them knows about jobs.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from app.web import evidence
from cgidm import __version__
from cgidm import result_signing as rs
from cgidm.errors import CgidmServiceError
from cgidm.jobs import (
    ArtifactLinks,
    ImageScore,
    JobResult,
    ResultFileError,
    SetTest,
    read_result_file,
)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STYLESHEETS = ("evidence.css", "report.css")
#: The picture kinds shown per image, in order ("base_recovered": when the check computed it).
SHOWN_KINDS = ("original", "partial", "recovered", "base_recovered")


class ReportInputError(CgidmServiceError, ValueError):
    """The given path is not a result cgidm can make a report of; the message says why."""

    code = "bad_result_file"


def fmt_time(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def fmt_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def label(key: Any) -> str:
    return str(key).replace("_", " ")


def fmt_bytes(value: Any) -> str:
    if not isinstance(value, int):
        return "\u2013"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def install_filters(env: jinja2.Environment) -> None:
    env.filters.update(time=fmt_time, num=fmt_number, label=label, size=fmt_bytes)
    env.globals.update(version=__version__, headlines=evidence.HEADLINES)


_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                          autoescape=jinja2.select_autoescape(["html"]))
install_filters(_env)


def stylesheet() -> str:
    return "\n".join((HERE / "static" / name).read_text() for name in STYLESHEETS)


# ------------------------------------------------------------------------------------------
# what the report says besides the evidence view


@dataclass
class SignatureFacts:
    """The result's signature as the report shows it, with whether it was checked here."""

    present: bool
    key_id: str | None = None
    digest: str | None = None
    signer: str | None = None
    state: str = "not checked"
    message: str = ""


def signature_facts(document: dict[str, Any], public_keys: dict[str, Any] | None) -> SignatureFacts:
    block = document.get(rs.SIGNATURE_FIELD)
    if not isinstance(block, dict):
        return SignatureFacts(False, state="unsigned",
                              message="This result carries no signature.")
    facts = SignatureFacts(True, block.get("key_id"), block.get("digest"), block.get("signer"))
    if not public_keys:
        facts.message = ("The signature was not checked when this report was made (no public "
                         "key at hand); check it with the command below.")
        return facts
    check = rs.check_signature(document, public_keys)
    facts.state = {rs.VALID: "valid", rs.EDITED: "EDITED AFTER SIGNING",
                   rs.NOT_OURS: "NOT SIGNED BY THIS SERVICE",
                   rs.UNSIGNED: "unsigned"}[check.outcome]
    facts.message = check.message
    return facts


def method_facts(document: dict[str, Any]) -> dict[str, Any]:
    """Model identities, software, device, settings and seed, from the result's provenance."""
    provenance = document.get("provenance") or {}
    models = []
    for role, model in (provenance.get("models") or {}).items():
        files = model.get("files") or []
        models.append({
            "role": role,
            "reference": model.get("reference") or model.get("id") or "\u2013",
            "uploaded_sha256": model.get("sha256"),
            "total_bytes": sum(f.get("bytes", 0) for f in files if isinstance(f.get("bytes"), int))
            if any("bytes" in f for f in files) else None,
            "files": files,
        })
    method = provenance.get("method") or {}
    controls = {c.get("name") for c in document.get("controls") or [] if isinstance(c, dict)}
    inversion = dict(method.get("inversion") or {})
    return {
        "models": models,
        "software": provenance.get("software") or {},
        "device": provenance.get("device"),
        "dtype": provenance.get("dtype"),
        "seed": method.get("seed", inversion.get("seed")),
        "prompt": provenance.get("prompt"),
        "prompt_source": provenance.get("prompt_source"),
        "score_metric": method.get("score_metric"),
        "inversion": inversion,
        "created": provenance.get("created") or provenance.get("created_at"),
        "inputs": [{"name": i.get("name"),
                    "role": i.get("role") or ("control" if i.get("name") in controls
                                              else "image"),
                    "filename": i.get("filename") or i.get("name"), "sha256": i.get("sha256")}
                   for i in provenance.get("inputs") or [] if isinstance(i, dict)],
    }


def verify_command(document: dict[str, Any], result_name: str) -> str:
    """The exact `cgidm verify` command a third party runs on this result."""
    models = (document.get("provenance") or {}).get("models") or {}
    parts = [f"cgidm verify {result_name}", "--public-key cgidm-signing-keys.json",
             "--images IMAGES_AND_CONTROLS_FOLDER"]
    for role in ("pretrained", "finetuned"):
        model = models.get(role) or {}
        reference = model.get("reference") or model.get("id") or role.upper()
        if model.get("uploaded"):
            reference = "THE_UPLOADED_MODEL_FILE"
        parts.append(f"--{role} {reference}")
    return " \\\n    ".join(parts)


def picture_problems(row: dict[str, Any], data: dict[str, bytes]) -> list[str]:
    """Kinds whose bytes differ from the signed ``picture_sha256`` of the row."""
    signed = row.get("picture_sha256") or {}
    return [kind for kind, payload in data.items()
            if kind in signed and hashlib.sha256(payload).hexdigest() != signed[kind]]


def data_uri(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode("ascii")


@dataclass
class ReportParts:
    """Everything the template needs next to the evidence view."""

    title_facts: list[tuple[str, str]]
    alpha: float
    controls: list[str]
    signature: SignatureFacts
    method: dict[str, Any]
    verify_command: str
    picture_notes: dict[str, str] = field(default_factory=dict)
    credentials: dict[str, Any] = field(default_factory=dict)
    generated: datetime = field(default_factory=lambda: datetime.now().astimezone())


def report_parts(document: dict[str, Any], result: JobResult, alpha: float,
                 title_facts: list[tuple[str, str]], public_keys: dict[str, Any] | None,
                 result_name: str, picture_notes: dict[str, str]) -> ReportParts:
    test = result.controls_test
    credentials = {row["name"]: row.get("content_credentials")
                   for row in [*document.get("images", []), *document.get("controls", [])]
                   if isinstance(row, dict) and isinstance(row.get("content_credentials"), dict)
                   and row["content_credentials"].get("present")}
    return ReportParts(title_facts, test.alpha if test is not None else alpha,
                       [c.name for c in result.controls], signature_facts(document, public_keys),
                       method_facts(document), verify_command(document, result_name),
                       picture_notes, credentials)


#: Parts of the result the "Method and reproduction" pages show already; the generic record
#: after them leaves them out so that the document stays a few pages.
SHOWN_IN_METHOD = {"signature", "config"}
SHOWN_IN_METHOD_PROVENANCE = {"models", "software", "method", "inputs"}


def recorded_rest(ev: evidence.Evidence) -> dict[str, Any]:
    rest = {k: v for k, v in ev.provenance.items() if k not in SHOWN_IN_METHOD}
    if isinstance(rest.get("provenance"), dict):
        rest["provenance"] = {k: v for k, v in rest["provenance"].items()
                              if k not in SHOWN_IN_METHOD_PROVENANCE}
    if isinstance(rest.get("job"), dict):  # the inputs' file names are in the inputs table
        rest["job"] = {k: v for k, v in rest["job"].items() if k != "inputs"}
    return rest


def render_html(ev: evidence.Evidence, parts: ReportParts) -> str:
    return _env.get_template("report.html").render(
        ev=ev, report=True, css=stylesheet(), parts=parts, generated=parts.generated,
        recorded=recorded_rest(ev))


def render_pdf(html: str) -> bytes:
    """The HTML report printed by WeasyPrint (its pictures are data URIs: nothing is fetched)."""
    import logging

    import weasyprint
    from PIL import ImageFile
    from weasyprint.urls import URLFetcher

    # Importing WeasyPrint sets PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES = True: after
    # the gateway's first PDF report every truncated upload would decode (grey-filled) and be
    # accepted as a job. Our report pictures are complete PNGs; nothing here needs it.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    # the stylesheet's screen-only rules (@media (max-width...), overflow-x) are warned about
    # on every render; they do not apply to print
    logging.getLogger("weasyprint").setLevel(logging.ERROR)

    # data: URIs only; anything else would be a request from the server, refused
    fetcher = URLFetcher(allowed_protocols={"data"}, fail_on_errors=True)
    pdf: bytes = weasyprint.HTML(string=html, url_fetcher=fetcher).write_pdf()
    return pdf


# ------------------------------------------------------------------------------------------
# a result on disk (cgidm report)


@dataclass
class LocalResult:
    document: dict[str, Any]
    folder: Path
    path: Path
    service: bool


def load_local_result(path: Path) -> LocalResult:
    """A ``cgidm check`` folder or its results.json, a service result.json or job document."""
    if path.is_dir():
        for name in ("results.json", "result.json"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise ReportInputError(f"{path}: no results.json (cgidm check) or result.json (cgidm "
                                   "submit) in this folder")
    try:
        document = read_result_file(path)
    except ResultFileError as exc:
        raise ReportInputError(str(exc)) from exc
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ReportInputError(f"{path} is not a cgidm result (no 'images')")
    return LocalResult(document, path.parent, path, service="pretrained" in document)


def _local_picture(local: LocalResult, row: dict[str, Any], kind: str) -> bytes | None:
    name = row.get(kind) if not local.service else f"{row.get('name')}.{kind}.png"
    if not isinstance(name, str) or "/" in name or "\\" in name:
        return None
    path = local.folder / name
    return path.read_bytes() if path.is_file() else None


def local_job_result(local: LocalResult) -> tuple[JobResult, dict[str, dict[str, str]],
                                                  dict[str, str]]:
    """(the result in the service's shape, data URIs of its pictures, picture notes)."""
    document = local.document
    if local.service:
        result = JobResult.model_validate(document)
    else:
        settings = document.get("settings") or {}
        links = ArtifactLinks(recovered="", partial="", side_by_side="")

        def row(item: dict[str, Any], role: str) -> ImageScore:
            values = {k: v for k, v in item.items() if k not in ("artifacts", "role")}
            return ImageScore(**values, role=role, artifacts=links)

        test = document.get("set_test")
        result = JobResult(
            pretrained=str(settings.get("pretrained", "?")),
            finetuned=str(settings.get("finetuned", "?")),
            metric=str(settings.get("metric") or "ssim"),
            images=[row(i, "image") for i in document["images"]],
            controls=[row(c, "control") for c in document.get("controls", [])],
            controls_test=SetTest(**{k: v for k, v in test.items()
                                     if k not in ("p_values", "verdicts")}) if test else None,
            evidence=document.get("evidence"), provenance=document.get("provenance") or {})
    pictures: dict[str, dict[str, str]] = {}
    notes: dict[str, str] = {}
    for item in [*document["images"], *document.get("controls", [])]:
        found = {kind: data for kind in SHOWN_KINDS
                 if (data := _local_picture(local, item, kind)) is not None}
        pictures[item["name"]] = {kind: data_uri(data) for kind, data in found.items()}
        notes[item["name"]] = picture_note(item, found)
    return result, pictures, notes


def picture_note(row: dict[str, Any], found: dict[str, bytes]) -> str:
    if not row.get("picture_sha256"):
        return "This result records no hashes of its pictures (made before they were signed)."
    bad = picture_problems(row, found)
    if bad:
        return ("WARNING: the " + ", ".join(label(k) for k in bad) + " picture(s) shown differ "
                "from the ones the signed result names (their sha256 does not match).")
    checked = [k for k in found if k in row["picture_sha256"]]
    if not checked:
        return "No picture of this image was at hand to check against its signed hash."
    return ("The " + ", ".join(label(k) for k in checked) + " picture(s) shown have the sha256 "
            "recorded in the signed result.")
