"""``cgidm report``: the evidence report as PDF or HTML, and the evidence table that ``cgidm
check``, ``cgidm submit`` and ``cgidm demo`` print (torch-free: ``submit`` is a client that runs
where torch is not installed, and a report is made from a stored result without re-running
anything).

One score everywhere: the table's ``score`` column is the number the p-values and verdicts were
computed from (``evidence_score``, cgidm_core.evidence) whenever there were controls; the
recovery's similarity stands beside it. Without controls there is no evidence score (it is
standardised over images and controls together) and the table says that its score is the
similarity.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def shown_score(record: dict[str, Any]) -> float:
    """The score to show for one image: its ``evidence_score`` when the document has one (the
    number its p-value rests on), else its similarity ``score``."""
    value = record.get("evidence_score")
    return float(record["score"] if value is None else value)


def score_legend(records: list[dict[str, Any]], evidence: dict[str, Any] | None,
                 metric: str | None) -> str:
    """One sentence saying which score the table's ``score`` column holds."""
    similarity = f"{metric} similarity" if metric else "similarity"
    if any(r.get("evidence_score") is not None for r in records):
        what = (evidence or {}).get("description") or "the verdict's score"
        return (f"score = the evidence score the p-values and verdicts rest on: {what} "
                f"(evidence_score in the result; the recovery's {similarity}: score)")
    return (f"score = {similarity} of the recovery vs its original (higher = more member-like); "
            "no controls, so no evidence score, p-values or verdicts: the verdict's score is "
            "standardised over images and controls together")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report",
        help="make the evidence report (PDF and/or HTML) of a stored result",
        description="The report the service serves at /jobs/{id}/report.pdf, made from a `cgidm "
        "check` output folder (or its results.json) or a `cgidm submit` result.json: a cover "
        "page with the finding and its error rate, one page per image, then the method and "
        "the exact `cgidm verify` command. Nothing is re-run.",
    )
    parser.add_argument("result", help="cgidm check output folder or results.json, or a "
                        "service result.json; or an audit: a cgidm audit / submit-audit output "
                        "folder or its audit.json (the per-audit report)")
    parser.add_argument("--pdf", metavar="FILE", help="write the PDF here")
    parser.add_argument("--html", metavar="FILE", help="write the self-contained HTML here")
    parser.add_argument("--public-key", action="append", metavar="FILE",
                        help="check the signature with these public keys (default: the local "
                        "key of `cgidm keys`, if there is one); the report says the outcome")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="significance level shown when the result has no set test")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.web import evidence, report_document
    from cgidm import result_signing
    from cgidm_core.errors import ConfigError

    if not args.pdf and not args.html:
        raise ConfigError("say what to write: --pdf FILE and/or --html FILE")
    if _is_audit(Path(args.result)):
        return _audit_report(args)
    try:
        local = report_document.load_local_result(Path(args.result))
    except report_document.ReportInputError as exc:
        raise ConfigError(str(exc)) from exc
    keys: dict[str, Any] = {}
    for path in args.public_key or []:
        keys.update(result_signing.read_public_keys(Path(path)))
    if not args.public_key and (mine := result_signing.existing_key()) is not None:
        keys = result_signing.keys_of_set(result_signing.key_set(mine))
    result, pictures, notes = report_document.local_job_result(local)
    job_id = str((local.document.get("provenance") or {}).get("job_id") or "local check")
    settings = {k: v for k, v in (local.document.get("settings") or {}).items()
                if v is not None and k not in ("pair", "inversion")}
    view = evidence.build_result(job_id, result, args.alpha, pictures, settings, None)
    facts = [("Result file", str(local.path))]
    if job_id != "local check":
        facts.insert(0, ("Job", job_id))
    parts = report_document.report_parts(local.document, result, args.alpha, facts, keys or None,
                                          local.path.name, notes)
    html = report_document.render_html(view, parts)
    if args.html:
        Path(args.html).write_text(html)
        print(f"wrote {args.html}")
    if args.pdf:
        Path(args.pdf).write_bytes(report_document.render_pdf(html))
        print(f"wrote {args.pdf}")
    if parts.signature.state not in ("valid", "not checked"):
        print(f"warning: signature {parts.signature.state}: {parts.signature.message}")
    return 0


def _is_audit(path: Path) -> bool:
    """An audit output folder (audit.json) or an audit.json, rather than a check's result."""
    import json

    from cgidm.audit_signing import AUDIT_FILE, is_audit_document

    if path.is_dir():
        return (path / AUDIT_FILE).is_file()
    try:
        return path.is_file() and is_audit_document(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError):
        return False  # the check report's loader says what is wrong with it


def _public_keys(paths: list[str] | None) -> dict[str, Any]:
    """The keys given, else the local key of `cgidm keys` (and its retired ones), if any."""
    from cgidm import result_signing

    keys: dict[str, Any] = {}
    for path in paths or []:
        keys.update(result_signing.read_public_keys(Path(path)))
    if not paths and (mine := result_signing.existing_key()) is not None:
        keys = result_signing.keys_of_set(result_signing.key_set(mine))
    return keys


def _audit_report(args: argparse.Namespace) -> int:
    """The audit report (app/web/audit_report.py) of an audit output folder or audit.json."""
    from app.web import audit_report, report_document
    from cgidm.audit_signing import AuditFileError, load_local_audit
    from cgidm_core.errors import ConfigError

    try:
        local = load_local_audit(Path(args.result))
    except AuditFileError as exc:
        raise ConfigError(str(exc)) from exc
    facts = [("Audit file", str(local.path))]
    if local.audit_id:
        facts.insert(0, ("Audit", local.audit_id))
    report = audit_report.build_report(local.document, audit_report.local_pictures(local), facts,
                                       _public_keys(args.public_key) or None, local.path.name)
    html = audit_report.render_html(report)
    if args.html:
        Path(args.html).write_text(html)
        print(f"wrote {args.html}")
    if args.pdf:
        Path(args.pdf).write_bytes(report_document.render_pdf(html))
        print(f"wrote {args.pdf}")
    if report.signature.state not in ("valid", "not checked"):
        print(f"warning: signature {report.signature.state}: {report.signature.message}")
    return 0


def print_table(records: list[dict[str, Any]], set_test: object,
                evidence: dict[str, Any] | None = None, *, metric: str | None = None,
                controls: list[dict[str, Any]] | None = None,
                show_set_test: bool = True) -> None:
    """One line per image (score; the similarity beside it and p-value and verdict when there
    were controls), the controls' scores when given, then the set test. ``records`` are the
    per-image documents of results.json or of a service result."""
    width = max(len("image"), *(len(r["name"]) for r in records + (controls or [])))
    with_p = records[0].get("p_value") is not None
    with_evidence = any(r.get("evidence_score") is not None for r in records)
    sim = (metric or "similarity")[:10]
    print(score_legend(records, evidence, metric))
    header = f"{'image':<{width}}  {'score':>9}"
    if with_evidence:
        header += f"  {sim:>10}"
    if with_p:
        header += "  p-value  verdict"
    print(header)
    print("-" * len(header))
    for r in records:
        line = f"{r['name']:<{width}}  {shown_score(r):>9.4f}"
        if with_evidence:
            line += f"  {float(r['score']):>10.4f}"
        if with_p:
            line += f"  {r['p_value']:>7.3f}  {r['verdict']}"
        print(line)
    if controls:
        print(f"\n{'control':<{width}}  {'score':>9}" + (f"  {sim:>10}" if with_evidence else ""))
        for r in controls:
            print(f"{r['name']:<{width}}  {shown_score(r):>9.4f}"
                  + (f"  {float(r['score']):>10.4f}" if with_evidence else ""))
    if isinstance(set_test, dict) and show_set_test:
        print(
            f"\nset test (one-sided Mann-Whitney U, suspects > controls): "
            f"U={set_test['u_statistic']:.1f}, p={set_test['p_value']:.4g}, "
            f"AUC={set_test['auc']:.3f}"
        )
    too_small = size_advice(records, controls, set_test, evidence)
    if too_small:
        print(f"note: {too_small}")


def size_advice(records: list[dict[str, Any]], controls: list[dict[str, Any]] | None,
                set_test: object, evidence: dict[str, Any] | None) -> str | None:
    """The power table's advice when the set is too small to decide (cgidm_core.power_table):
    the document's own sentence when it carries one (a service result), else computed here."""
    if evidence and evidence.get("too_small_to_decide"):
        return str(evidence["too_small_to_decide"])
    from cgidm_core.power_table import advice

    n_controls = (set_test.get("n_controls") if isinstance(set_test, dict) else None)
    if n_controls is None:
        n_controls = len(controls or [])
    p_value = set_test.get("p_value") if isinstance(set_test, dict) else None
    try:
        return advice(len(records), int(n_controls), p_value)
    except (OSError, ValueError, KeyError):  # an installation without the table: no advice
        return None
