"""The web app's pages, report and offline docs over HTTP, and the verdict wording they share.

The browser itself is exercised in test_web_browser.py; these check what the server sends.
"""

from __future__ import annotations

import re
import subprocess
from datetime import datetime, timezone

import pytest
import tomllib

from app.web import evidence
from cgidm.jobs import ArtifactLinks, ImageScore, JobRecord, JobResult, JobSettings, SetTest
from cgidm_testkit.processes import REPO_ROOT, png_bytes, wait_for_job

#: src/href values that would leave the service (a CDN, external fonts).
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


# ------------------------------------------------------------------------------------------
# verdict wording (no server)


def _record(images: list[float], controls: list[float], alpha: float = 0.05,
            p_values: list[float] | None = None, verdicts: list[str] | None = None,
            set_p: float = 0.5) -> JobRecord:
    def score(name: str, role: str, value: float, p=None, verdict=None) -> ImageScore:
        links = ArtifactLinks(**{k: f"/x/{name}/{k}.png"
                                 for k in ("recovered", "partial", "side_by_side")})
        return ImageScore(name=name, role=role, score=value, metrics={"ssim": value},
                          p_value=p, verdict=verdict, artifacts=links)

    n1, n0 = len(images), len(controls)
    p_values = p_values or [None] * n1
    verdicts = verdicts or [None] * n1
    test = SetTest(u_statistic=0, p_value=set_p, auc=0.5, alpha=alpha, n_suspect=n1,
                   n_controls=n0) if controls else None
    result = JobResult(
        pretrained="base", finetuned="suspect", metric="ssim",
        images=[score(f"img{i}", "image", v, p_values[i], verdicts[i])
                for i, v in enumerate(images)],
        controls=[score(f"ctl{i}", "control", v) for i, v in enumerate(controls)],
        controls_test=test, config={"steps": 100}, pair={"family": "ddpm"},
        elapsed_seconds=1.0)
    return JobRecord(job_id="0" * 32, status="succeeded", created_at=datetime.now(timezone.utc),
                     settings=JobSettings(pretrained="base", finetuned="suspect"),
                     result=result)


def _cards(record: JobRecord) -> list[evidence.Card]:
    return evidence.build(record, 0.05, {}).cards


def test_report_shows_the_base_recovery_beside_the_suspects_or_says_it_was_not_computed():
    from app.web import report_document

    record = _record([0.9], [0.4])
    assert record.result is not None
    record.result.images[0].base_recovery = {"ssim": 0.31}  # as the worker records it
    dot = report_document.data_uri(png_bytes(1, (4, 4)))
    pictures = {"img0": dict.fromkeys(("original", "partial", "recovered", "base_recovered"),
                                      dot),
                "ctl0": dict.fromkeys(("original", "partial", "recovered"), dot)}
    view = evidence.build(record, 0.05, pictures)
    assert [p.kind for p in view.cards[0].pictures][-1] == "base_recovered"
    assert len(view.control_cards[0].pictures) == 3  # a result without it: three pictures
    parts = report_document.ReportParts([], 0.05, ["ctl0"], report_document.SignatureFacts(
        False), report_document.method_facts({}), "cgidm verify result.json")
    html = report_document.render_html(view, parts)
    assert html.count("<img ") == 7
    assert "Recovered by the base model alone</figcaption>" in html
    assert "Base model alone: ssim 0.31" in html and "pictures-4" in html
    record.result.images[0].base_recovery = None
    del pictures["img0"]["base_recovered"]
    html = report_document.render_html(evidence.build(record, 0.05, pictures), parts)
    assert "Recovery by the base model alone:</strong> not computed" in html


def test_no_controls_is_inconclusive_not_no_evidence():
    view = evidence.build(_record([0.9], []), 0.05, {})
    assert view.cards[0].verdict == "inconclusive"
    assert "No controls" in view.cards[0].detail
    assert view.set_verdict == "inconclusive"
    assert "add at least 19" in view.set_sentence


def test_too_few_controls_is_inconclusive_even_above_every_control():
    card = _cards(_record([0.9], [0.1, 0.2, 0.3], p_values=[0.25],
                          verdicts=["no_evidence"]))[0]
    assert card.verdict == "inconclusive"
    assert card.detail.startswith("Recovered better than all 3 of your controls (p = 0.25)")
    assert "only 3 controls: too few to reach significance" in card.detail
    assert "at least 19" in card.detail


def test_enough_controls_give_evidence_or_no_evidence_in_plain_words():
    controls = [i / 100 for i in range(19)]
    member, plain = _cards(_record([0.9, 0.05], controls, p_values=[0.05, 0.7],
                                   verdicts=["member_evidence", "no_evidence"]))
    assert member.verdict == "member_evidence"
    assert member.detail.startswith("Recovered better than all 19 of your controls (p = 0.05)")
    assert plain.verdict == "no_evidence"
    assert plain.detail.startswith("Recovered better than 5 of your 19 controls (p = 0.7)")
    assert "not proof" in plain.detail


def test_a_verdict_the_worker_could_not_reach_stays_inconclusive():
    controls = [i / 100 for i in range(19)]
    card = _cards(_record([0.9], controls, p_values=[0.05], verdicts=["inconclusive"]))[0]
    assert card.verdict == "inconclusive"
    assert "could not reach a verdict" in card.detail


def test_set_sentence_says_when_the_set_test_cannot_reach_significance():
    # Two images and two controls: even a perfect separation has p = 1/6 > 0.05.
    view = evidence.build(_record([0.9, 0.8], [0.1, 0.2], set_p=1 / 6), 0.05, {})
    assert view.set_verdict == "inconclusive"
    assert "cannot reach significance" in view.set_sentence
    strong = evidence.build(_record([0.9] * 10, [0.1] * 10, set_p=1e-5), 0.05, {})
    assert strong.set_verdict == "member_evidence"
    assert "significant at \u03b1 = 0.05" in strong.set_sentence


def test_provenance_shows_every_key_the_result_carries():
    record = _record([0.9], [])
    view = evidence.build(record, 0.05, {})
    assert {"config", "pair", "metric", "elapsed_seconds", "job"} <= set(view.provenance)


def test_defaults_shown_in_the_form_are_the_librarys():
    from cgidm_core import InversionConfig
    from cgidm_core.names import DEFAULT_METRIC

    config = InversionConfig()
    shown = evidence.SHOWN_DEFAULTS
    assert shown["metric"] == DEFAULT_METRIC
    for name in ("steps", "alpha", "epsilon", "t_min", "mc_samples", "seed",
                 "common_random_numbers", "reencode_partial"):
        assert shown[name] == getattr(config, name), name
    assert config.t_max is None and config.cell is None  # shown as words


def test_templates_and_assets_ship_in_the_package():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["app.web"]
    shipped = {p for pattern in patterns for p in (REPO_ROOT / "app" / "web").glob(pattern)}
    needed = {*(REPO_ROOT / "app/web/templates").iterdir(), *(REPO_ROOT / "app/web/static")
              .iterdir()}
    assert needed <= shipped


# ------------------------------------------------------------------------------------------
# the pages in-process (app_client, local mode); a finished job over HTTP (the session's Redis +
# S3 + worker + gateway stack)


def test_pages_load_nothing_from_elsewhere(app_client):
    """In-process (TestClient): what the pages reference is the point, not the sockets."""
    client = app_client
    for path in ("/", "/checks/" + "a" * 32, "/docs", "/redoc"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        assert not EXTERNAL.search(response.text), (path, EXTERNAL.findall(response.text))
        assert "'self'" in response.headers["content-security-policy"]
    page = client.get("/").text
    assert 'name="images"' in page and 'name="controls"' in page
    # The model upload (POST /models by the script) is not part of the check's form body.
    upload_inputs = re.findall(r'<input id="model-(?:file|prompt)"[^>]*>', page)
    assert len(upload_inputs) == 2 and not any(" name=" in i for i in upload_inputs)
    assert 'accept=".safetensors"' in upload_inputs[0]
    # Local mode (no keys): nothing to sign in to, the form shows at once.
    assert 'data-keys-required="false"' in page
    assert re.search(r'<div id="app-content"\s*>', page)
    for asset in ("/static/app/app.js", "/static/app/app.css", "/static/app/evidence.css",
                  "/static/api-docs/swagger-ui-bundle.js", "/static/api-docs/swagger-ui.css"):
        assert client.get(asset).status_code == 200, asset
    redoc = client.get("/static/api-docs/redoc.standalone.js")
    assert redoc.status_code == 200 and b"cdn.redoc.ly" not in redoc.content


@pytest.mark.slow
def test_report_evidence_and_recent_jobs_of_a_finished_job(client, submit, worker, tmp_path):
    from cgidm_testkit.content_credentials import sign_image

    # the painting carries its artist's C2PA credentials ("AI training not allowed")
    signed_png = sign_image(png_bytes(11, (40, 40)), "image/png")
    response = submit(images=[("sunflowers.png", signed_png)],
                      controls=[("<b>unpublished</b>.png", png_bytes(12, (40, 40)))])
    job_id = response.json()["job_id"]
    early = client.get(f"/jobs/{job_id}/report.html")
    assert early.status_code in (200, 409)  # 409 until it has succeeded
    job = wait_for_job(client, job_id)
    assert job["status"] == "succeeded", job

    report = client.get(f"/jobs/{job_id}/report.html")
    assert report.status_code == 200
    html = report.text
    sources = re.findall(r'<img[^>]*\bsrc="([^"]*)"', html)
    # original, half removed, the suspect's and the base model's recovery, for both pictures
    assert len(sources) == 8 and all(s.startswith("data:image/") for s in sources)
    assert not EXTERNAL.search(html) and "<script" not in html
    assert 'data-image-name="sunflowers"' in html and 'data-verdict="inconclusive"' in html
    assert "only 1 control: too few to reach significance" in html
    assert "evidence score the p-values and verdicts rest on" in html  # one score everywhere
    assert "@media print" in html
    # The upload's file name is shown (provenance) but never as markup.
    assert "&lt;b&gt;unpublished&lt;/b&gt;.png" in html and "<b>unpublished" not in html
    assert report.headers["content-security-policy"].startswith("default-src 'none'")

    # the PDF is the same document, printed: one page per image, the words of the HTML
    pdf = client.get(f"/jobs/{job_id}/report.pdf")
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    text = " ".join(subprocess.run(["pdftotext", "-", "-"], input=pdf.content, check=True,
                                   capture_output=True).stdout.decode().split())
    assert "sunflowers" in text and "only 1 control: too few to reach significance" in text
    assert "Recovered by the base model alone" in text and "Base model alone: ssim" in text
    # the result served in the job verifies with the keys the gateway publishes
    from cgidm import result_signing

    keys = result_signing.keys_of_set(
        client.get("/.well-known/cgidm-signing-keys.json").json())
    check = result_signing.check_signature(job["result"], keys)
    assert check.ok, check.message
    assert f"key {check.key_id}" in text.replace("key id", "key")
    credentials = job["result"]["images"][0]["content_credentials"]
    assert credentials["state"] == "valid_untrusted" and credentials["signer"].startswith(
        "Test Artist")
    assert job["result"]["controls"][0]["content_credentials"]["state"] == "none"
    assert "ai training not allowed" in text and "valid but untrusted" in text
    assert 'data-credentials="valid_untrusted"' in html

    # `cgidm submit`'s folder (result.json and the pictures): verifiable and reportable offline
    import json

    from cgidm.cli import main

    folder = tmp_path / "submitted"
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps(job["result"], indent=2))
    for row in job["result"]["images"] + job["result"]["controls"]:
        for kind in ("recovered", "partial"):
            (folder / f"{row['name']}.{kind}.png").write_bytes(
                client.get(row["artifacts"][kind]).content)
    keys = tmp_path / "keys.json"
    keys.write_text(client.get("/.well-known/cgidm-signing-keys.json").text)
    assert main(["verify", str(folder / "result.json"), "--public-key", str(keys),
                 "--signature-only"]) == 0
    assert main(["report", str(folder), "--public-key", str(keys), "--html",
                 str(tmp_path / "r.html")]) == 0
    offline = (tmp_path / "r.html").read_text()
    assert "picture(s) shown have the sha256 recorded in the signed result" in offline
    assert "signature valid" in offline and 'data-credentials="valid_untrusted"' in offline

    fragment = client.get(f"/jobs/{job_id}/evidence.html").text
    assert 'data-credentials="valid_untrusted"' in fragment
    assert f"/jobs/{job_id}/artifacts/sunflowers/original.png" in fragment
    original = client.get(f"/jobs/{job_id}/artifacts/sunflowers/original.png")
    assert original.status_code == 200 and original.content.startswith(b"\x89PNG")

    listed = client.get("/jobs", params={"limit": 100}).json()["jobs"]
    assert job_id in [j["job_id"] for j in listed]
    mine = next(j for j in listed if j["job_id"] == job_id)
    assert (mine["images"], mine["controls"], mine["status"]) == (1, 1, "succeeded")
    created = [j["created_at"] for j in listed]
    assert created == sorted(created, reverse=True)  # newest first


def test_signing_keys_are_published_without_a_key(app_client):
    from cgidm import result_signing as rs

    response = app_client.get("/.well-known/cgidm-signing-keys.json")
    assert response.status_code == 200
    published = response.json()
    assert published["scheme"] == rs.SCHEME and published["keys"][0]["status"] == "current"
    ids = rs.keys_of_set(published)
    assert list(ids) == [published["keys"][0]["key_id"]]
    # no private material is ever served
    assert "PRIVATE" not in response.text


def test_report_of_an_unknown_job_is_404(app_client):
    response = app_client.get("/jobs/" + "f" * 32 + "/report.html")
    assert response.status_code == 404
    assert response.json()["detail"][0]["type"] == "not_found"



def test_plot_and_cards_show_the_score_the_p_values_rest_on():
    """One score everywhere: with controls the dot plot places each picture at its evidence
    score (the number its p-value is computed from) and says so; the similarity stays beside
    it on the card. Without controls the page says that it shows the similarity and why."""
    record = _record([0.1], [0.5 + i / 100 for i in range(19)], p_values=[0.05],
                     verdicts=["member_evidence"])
    result = record.result
    result.images[0].evidence_score = 3.0
    for i, control in enumerate(result.controls):
        control.evidence_score = -1.0 - i / 100
    result.evidence = {"score": "fused", "description": "z(SSIM) + z(PSNR) + z(loss) + z(contrast)"}
    view = evidence.build(record, 0.05, {})
    assert view.plot.axis == "evidence score" and "p-values rest on" in view.plot.label
    assert [p.score for p in view.plot.points] == [3.0, *[-1.0 - i / 100 for i in range(19)]]
    assert view.plot.points[0].x == max(p.x for p in view.plot.points)  # ranked by evidence
    assert "evidence score the p-values and verdicts rest on" in view.score_sentence
    assert view.cards[0].evidence_score == 3.0 and view.cards[0].score == 0.1
    from app.web.routes import templates

    html = templates.env.from_string(
        '{% import "_evidence.html" as e with context %}{{ e.evidence(ev) }}'
    ).render(ev=view, report=True)
    assert "evidence score &rarr; higher: more member-like" in html
    assert "Evidence score <strong>3</strong>" in html
    assert "evidence score the p-values and verdicts rest on" in html

    bare = evidence.build(_record([0.9, 0.4], []), 0.05, {})
    assert bare.plot.axis == "ssim similarity"
    assert [p.score for p in bare.plot.points] == [0.9, 0.4]
    assert "no evidence score" in bare.score_sentence and "no evidence score" in bare.plot.label
