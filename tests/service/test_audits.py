"""Audits through the service: the 4xx answers (in-process gateway), one audit through the real
stack (gateway -> Redis -> worker -> S3) with a model that fails, and one cancelled while a model
runs. A worker SIGKILLed mid-audit is tests/service/test_worker_loss.py's (it waits out a real
lease)."""

from __future__ import annotations

import json

import pytest

from cgidm_testkit.processes import BUCKET, bucket_keys, png_bytes, s3_client, wait_until

IMAGES = [("images", (f"i{k}.png", png_bytes(k), "image/png")) for k in (1, 2, 3)]
CONTROLS = [("controls", (f"c{k}.png", png_bytes(k), "image/png")) for k in (11, 12, 13)]
GOOD_MODELS = [{"pretrained": "tiny-base", "finetuned": "tiny-ft"}]


def _post(http, models, files=None, **fields):
    data = {"models": models if isinstance(models, str) else json.dumps(models), "steps": "2",
            **{k: str(v) for k, v in fields.items()}}
    return http.post("/audits", data=data, files=files if files is not None else
                     IMAGES + CONTROLS)


@pytest.mark.parametrize(("models", "files", "fields", "loc", "kind"), [
    ("[not json", None, {}, ["body", "models"], "invalid_json"),
    ([], None, {}, ["body", "models"], "invalid_models"),
    ([{"pretrained": "tiny-base"}], None, {}, ["body", "models"], "invalid_models"),
    (GOOD_MODELS + [{"pretrained": "tiny-base", "finetuned": "nope"}], None, {},
     ["body", "models", 1, "finetuned"], "unknown_model"),
    (GOOD_MODELS, IMAGES, {}, ["body", "controls"], "missing"),
    (GOOD_MODELS, None, {"fdr": "1.5"}, ["body", "fdr"], "less_than"),
    (GOOD_MODELS, None, {"family_wise": "sidak"}, ["body", "family_wise"], "invalid_choice"),
    (GOOD_MODELS, None, {"colour": "red"}, ["body", "colour"], "unknown_field"),
])
def test_bad_audit_requests_are_4xx_naming_the_field(app_client, models, files, fields, loc,
                                                      kind):
    response = _post(app_client, models, files, **fields)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == loc and detail["type"] == kind, detail


def test_unknown_audit_is_404(app_client):
    for method, path in (("GET", "/audits/" + "0" * 32), ("GET", "/audits/not-an-id"),
                         ("DELETE", "/audits/" + "1" * 32)):
        response = app_client.request(method, path)
        assert response.status_code == 404, response.text
        assert response.json()["detail"][0]["type"] == "not_found"


def test_a_queued_audit_is_accepted_then_cancelled(app_client):
    """No worker runs here: the audit stays queued, shows every model queued, and is cancelled."""
    response = _post(app_client, GOOD_MODELS * 2)
    assert response.status_code == 202, response.text
    audit_id = response.json()["audit_id"]
    assert response.headers["location"] == f"/audits/{audit_id}"
    audit = app_client.get(f"/audits/{audit_id}").json()
    assert audit["status"] == "queued" and audit["progress"]["models_total"] == 2
    assert [m["state"] for m in audit["progress"]["models"]] == ["queued", "queued"]
    cancelled = app_client.delete(f"/audits/{audit_id}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"


def test_a_broker_lost_while_the_groups_are_sent_is_503_and_stores_no_audit(app_client,
                                                                          monkeypatch):
    """The gateway sends the audit's groups itself (9 models of one base: two groups). The
    broker failing after the first was published: 503 ``broker_unavailable``, and the audit is
    deleted, so the group already sent finds no request and does nothing (nothing stranded)."""
    celery = app_client.app.state.services.celery
    publish, sent = celery.send_task, []

    def broker_gone_after_one(*args, **kwargs):
        if sent:
            raise ConnectionResetError("the broker closed the connection")
        sent.append(kwargs["args"])  # [audit id, model indices]
        return publish(*args, **kwargs)

    monkeypatch.setattr(celery, "send_task", broker_gone_after_one)
    response = _post(app_client, GOOD_MODELS * 9)
    assert response.status_code == 503, response.text
    assert response.json()["detail"][0]["type"] == "broker_unavailable"
    [(audit_id, indices)] = sent
    assert indices == list(range(8))
    assert app_client.get(f"/audits/{audit_id}").status_code == 404


@pytest.mark.slow  # starts servers and processes
def test_audit_through_the_stack_goes_on_past_a_model_that_fails(
        worker, client, gateway_url, s3_endpoint, service_env, monkeypatch, tmp_path):
    models = [{"pretrained": "tiny-base", "finetuned": "tiny-ft"},
              {"pretrained": "other-base", "finetuned": "other-ft"},
              {"pretrained": "tiny-base", "finetuned": "corrupt-ft"}]
    # through `cgidm submit-audit` (the client): it submits, follows and downloads the result
    from cgidm.cli import main

    for role, seeds in (("images", (1, 2, 3)), ("controls", (11, 12, 13))):
        (tmp_path / role).mkdir()
        for k in seeds:
            (tmp_path / role / f"{role[0]}{k}.png").write_bytes(png_bytes(k))
    (tmp_path / "models.json").write_text(json.dumps(models))
    code = main(["submit-audit", "--server", gateway_url, "--images", str(tmp_path / "images"),
                 "--controls", str(tmp_path / "controls"), "--models",
                 str(tmp_path / "models.json"), "--out", str(tmp_path / "out"), "--steps", "2",
                 "--screen-clear-p", "1", "--timeout", "120"])  # 1: every model gets the full
    # verdict, so pictures are made and stored
    assert code == 5  # partial: corrupt-ft could not be tested (cgidm.commands.audit.EXIT_PARTIAL)
    audit_id = json.loads((tmp_path / "out" / "audit.json").read_text())["audit_id"]
    audit = client.get(f"/audits/{audit_id}").json()
    assert audit["status"] == "succeeded", audit
    assert audit["progress"]["models_done"] == 3 and audit["progress"]["fraction"] == 1.0
    result = audit["result"]
    assert [m["rank"] for m in result["models"]] == [1, 2, None]
    by_model = {m["finetuned"]: m for m in result["models"]}
    broken = by_model["corrupt-ft"]
    # failed: its message kept, not ranked, not flagged, not in the correction (a note says so)
    assert broken["tier"] == "error" and broken["p_value"] is None and not broken["flagged"]
    assert broken["q_value"] is None and "left out" in broken["note"]
    assert broken["error"]["code"] == "model_format"
    assert broken["error"]["message"].startswith("could not load the UNet")
    assert result["models"][-1]["finetuned"] == "corrupt-ft"
    for name in ("tiny-ft", "other-ft"):
        model = by_model[name]
        assert model["tier"] == "full" and 0 < model["p_value"] <= 1
        assert len(model["images"]) == 3 and "evidence_score" in model["images"][0]
    assert result["counts"] == {"models": 3, "full_verdicts": 2, "cleared_by_screen": 0,
                                "errors": 1, "flagged": 0}
    assert result["decision"]["correction"] == "bh"
    # signed by the service's key, like a job's result, and checked offline from the saved file
    from cgidm.result_signing import check_signature, keys_of_set

    published = client.get("/.well-known/cgidm-signing-keys.json").json()
    assert check_signature(result, keys_of_set(published)).ok
    assert result["signature"]["signer"] == "cgidm service" and result["audit_id"] == audit_id
    (tmp_path / "keys.json").write_text(json.dumps(published))
    assert main(["verify-audit", str(tmp_path / "out"), "--public-key",
                 str(tmp_path / "keys.json")]) == 0
    # pictures of every full-verdict model are stored and served, listed for flagged ones only
    picture = client.get(f"/audits/{audit_id}/pictures/0/i1/side_by_side.png")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert client.delete(f"/audits/{audit_id}").status_code == 409
    page = client.get(f"/audits/{audit_id}/fragment.html")
    assert page.status_code == 200 and "corrupt-ft" in page.text
    assert broken["error"]["message"][:40] in page.text.replace("&#39;", "'")


@pytest.mark.slow  # starts servers and processes
def test_cancel_a_running_audit_stops_its_model_and_starts_no_other(
        worker, client, s3_endpoint):
    """DELETE /audits/{id} while model 0 is in its full verdict: it stops at its next cancel
    check (every 2 s) short of its steps, models 1 and 2 never start, the audit says cancelled
    with each model's state, and storage holds the request, the inputs, the cancel marker and
    model 0's progress marked stopped; no model entry, no result, no error."""
    models = [{"pretrained": "tiny-base", "finetuned": "tiny-ft"}] * 3
    response = _post(client, models, steps=2000, screen_clear_p=1)
    assert response.status_code == 202, response.text
    audit_id = response.json()["audit_id"]

    def running(audit):
        row = audit["progress"]["models"][0]
        return audit if row["state"] == "running" and row["steps_done"] > 0 else None

    wait_until(lambda: running(client.get(f"/audits/{audit_id}").json()), 120,
               "model 0 running")
    cancelled = client.delete(f"/audits/{audit_id}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    s3 = s3_client(s3_endpoint)
    prefix = f"svc/audits/{audit_id}/"

    def stopped():
        try:
            body = s3.get_object(Bucket=BUCKET, Key=prefix + "progress/0000.json")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
        record = json.loads(body)
        return record if record.get("stopped") == "cancelled" else None

    record = wait_until(stopped, 60, "model 0 stopped")
    assert 0 < record["steps_done"] < record["steps_total"] == 2000
    audit = client.get(f"/audits/{audit_id}").json()
    assert audit["status"] == "cancelled" and audit["result"] is None and audit["error"] is None
    assert [m["state"] for m in audit["progress"]["models"]] == ["cancelled"] * 3
    assert audit["progress"]["models"][0]["steps_done"] == record["steps_done"]
    keys = {k.removeprefix(prefix) for k in bucket_keys(s3_endpoint, prefix)}
    assert {k for k in keys if not k.startswith(("images/", "controls/"))} == \
        {"request.json", "cancel", "progress/0000.json"}, keys
    assert client.delete(f"/audits/{audit_id}").status_code in (202, 409)


def test_audit_page_ranks_models_and_shows_the_top_hits_pictures(app_client):
    """The page renders a stored audit (as the workers leave it): the ranked table, and the
    pictures of the flagged model only."""
    from datetime import datetime, timezone

    from cgidm.audits import AuditInput, AuditModelSpec, AuditRequest, AuditStore, new_audit_id
    from cgidm_core.audit import decide_models

    store = AuditStore(app_client.app.state.services.store.storage)
    audit_id = new_audit_id()
    specs = [AuditModelSpec(pretrained="tiny-base", finetuned=name)
             for name in ("quiet-model", "copying-model")]
    store.create(AuditRequest(audit_id=audit_id, created_at=datetime.now(timezone.utc),
                              models=specs, images=[AuditInput(name="i1", key="k", sha256="0")],
                              controls=[AuditInput(name="c1", key="k2", sha256="0")]), [])
    entries = [{"index": 0, "pretrained": "tiny-base", "finetuned": "quiet-model",
                "tier": "screen", "screen_p_value": 0.7, "p_value": 1.0, "images": []},
               {"index": 1, "pretrained": "tiny-base", "finetuned": "copying-model",
                "tier": "full", "screen_p_value": 0.001, "p_value": 0.001,
                "images": [{"name": "i1", "evidence_score": 3.0, "p_value": 0.01}]}]
    for entry in entries:
        store.save_model(audit_id, entry["index"], entry)
    store.storage.put_bytes(store.picture_key(audit_id, 1, "i1", "side_by_side"), png_bytes(5))
    ranked = decide_models(entries)
    store.save_result(audit_id, {"models": ranked, "counts": {
        "models": 2, "flagged": 1, "full_verdicts": 1, "cleared_by_screen": 1},
        "decision": {"level": 0.05, "controls": "false discovery rate",
                     "screen": {"rule": "screen rule"}}})
    shell = app_client.get(f"/audits/{audit_id}/page")  # the page; its script asks for:
    assert shell.status_code == 200 and f'data-audit-id="{audit_id}"' in shell.text
    # the Cancel button is in the shell (the fragment is replaced every poll), hidden until the
    # script sees the audit running; the script is the page's own file (CSP: no inline code)
    assert 'id="audit-cancel" class="danger" hidden' in shell.text
    assert '<script src="/static/app/app.js"' in shell.text and "<script>" not in shell.text
    page = app_client.get(f"/audits/{audit_id}/fragment.html")
    assert page.status_code == 200, page.text
    html = page.text
    assert html.index("copying-model") < html.index("quiet-model")  # ranked
    assert html.count("<img src=\"data:image/png;base64,") == 1  # the flagged model's picture
    assert "1 of 2 models flagged" in html


def test_audit_report_pdf_of_a_signed_stored_audit(app_client, tmp_path):
    """GET /audits/{id}/report.pdf and .html from a stored audit signed with the service's key
    (as worker/audit_tasks.py assembles it): the flagged model named on a rendered page, its
    picture checked against its signed hash, the signature valid; one changed byte of the
    stored result makes the report say so. An unfinished audit has no report (409)."""
    import hashlib
    import subprocess
    from datetime import datetime, timezone

    from cgidm.audit_signing import SIGNER_SERVICE
    from cgidm.audits import AuditInput, AuditModelSpec, AuditRequest, AuditStore, new_audit_id
    from cgidm.result_signing import load_or_create_key, sign_document
    from cgidm_core.audit import AuditModel, decide_models, decision_settings, failed_entry

    services = app_client.app.state.services
    store = AuditStore(services.store.storage)
    audit_id = new_audit_id()
    specs = [AuditModelSpec(pretrained="tiny-base", finetuned=name)
             for name in ("quiet-model", "copying-model", "broken-model")]
    store.create(AuditRequest(audit_id=audit_id, created_at=datetime.now(timezone.utc),
                              models=specs, images=[AuditInput(name="i1", key="k", sha256="0")],
                              controls=[AuditInput(name="c1", key="k2", sha256="0")]), [])
    assert app_client.get(f"/audits/{audit_id}/report.pdf").status_code == 409  # queued
    picture = png_bytes(5)
    entries = [{"index": 0, "pretrained": "tiny-base", "finetuned": "quiet-model",
                "tier": "screen", "screen_p_value": 0.7, "p_value": 1.0, "images": []},
               {"index": 1, "pretrained": "tiny-base", "finetuned": "copying-model",
                "tier": "full", "screen_p_value": 0.001, "p_value": 0.001,
                "images": [{"name": "i1", "evidence_score": 3.0, "p_value": 0.01}],
                "picture_sha256": {"i1": {"side_by_side": hashlib.sha256(picture).hexdigest()}}},
               failed_entry(2, AuditModel("tiny-base", "broken-model"),
                            FileNotFoundError("no model files at broken-model"))]
    for entry in entries:
        store.save_model(audit_id, entry["index"], entry)
    store.storage.put_bytes(store.picture_key(audit_id, 1, "i1", "side_by_side"), picture)
    document = {"models": decide_models(entries), "decision": decision_settings(0.05, "bh", 0.2),
                "counts": {"models": 3, "flagged": 1, "full_verdicts": 1,
                           "cleared_by_screen": 1, "errors": 1},
                "images": ["i1"], "controls": ["c1"], "audit_id": audit_id}
    key = load_or_create_key(services.settings.resolved_signing_key)
    store.save_result(audit_id, sign_document(document, key, signer=SIGNER_SERVICE))

    response = app_client.get(f"/audits/{audit_id}/report.pdf")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pdf"
    pdf = tmp_path / "audit.pdf"
    pdf.write_bytes(response.content)
    subprocess.run(["pdftoppm", "-r", "20", "-png", "-f", "1", "-l", "1", str(pdf),
                    str(tmp_path / "page")], check=True)
    assert len(list(tmp_path.glob("page-*.png"))) == 1
    text = " ".join(subprocess.run(["pdftotext", str(pdf), "-"], check=True,
                                   capture_output=True, text=True).stdout.split())
    assert "1 of 3 suspect models was flagged" in text and "copying-model" in text
    # the failed model: listed with its error, unranked, outside the 2 models corrected over
    assert "broken-model" in text and "no model files at broken-model" in text
    assert "Across the 2 models tested" in text and "1 could not be tested" in text
    assert "signature valid" in text and key.key_id in text
    html = app_client.get(f"/audits/{audit_id}/report.html").text
    assert html.count('<img src="data:image/png;base64,') == 1
    assert "has the sha256 recorded in the signed audit" in html

    # one byte of the stored result changed after signing
    stored = store.result(audit_id)
    stored["models"][0]["finetuned"] = "copying-modem"
    store.save_result(audit_id, stored)
    html = app_client.get(f"/audits/{audit_id}/report.html").text
    assert "EDITED AFTER SIGNING" in html
