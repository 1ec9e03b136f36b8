"""A signed result is served as it was signed: a result stored before the job models gained a
field still verifies when the gateway serves it (GET /jobs/{id}) and in its report. In-process
gateway (TestClient); the result is written into storage the way a worker of that older version
wrote it."""

from __future__ import annotations

from cgidm import result_signing as rs
from cgidm.jobs import (
    ImageScore,
    InputFile,
    JobRecord,
    JobResult,
    JobSettings,
    artifact_links,
    input_key,
    job_prefix,
    new_job_id,
    utcnow,
)
from tests.service.inprocess import gateway_in_process

#: Fields of JobResult with defaults that an older worker's result did not have.
ADDED_SINCE = ("batch_size_used", "oom_halvings", "prompt_warning", "evidence")


def _older_signed_result(job_id: str, key: rs.SigningKey) -> dict:
    row = ImageScore(name="sunflowers", role="image", score=0.61, metrics={"ssim": 0.61},
                     artifacts=artifact_links(job_id, "sunflowers"))
    document = JobResult(pretrained="tiny-base", finetuned="tiny-ft", metric="ssim",
                         images=[row]).model_dump(mode="json")
    for name in ADDED_SINCE:
        del document[name]
    for item in document["images"]:
        del item["evidence_score"]  # an image field added since, too
    return rs.sign_document(document, key, signer="cgidm service")


def test_a_result_signed_before_the_model_gained_fields_still_verifies(tmp_path,
                                                                        registry_file):
    with gateway_in_process(tmp_path / "data", registry_file) as http:
        services = http.app.state.services
        key = rs.load_or_create_key(services.settings.resolved_signing_key)
        job_id = new_job_id()
        signed = _older_signed_result(job_id, key)
        record = JobRecord(
            job_id=job_id, status="succeeded", created_at=utcnow(), started_at=utcnow(),
            finished_at=utcnow(), settings=JobSettings(pretrained="tiny-base",
                                                       finetuned="tiny-ft"),
            inputs=[InputFile(name="sunflowers", role="image", width=8, height=8,
                              key=input_key(job_id, "image", 0, "sunflowers"))],
            attempt="a1-0123abcd")
        stored = record.model_dump(mode="json")
        stored["result"] = signed  # exactly as the older worker wrote job.json
        services.store.storage.put_json(job_prefix(job_id) + "job.json", stored)
        keys = rs.keys_of_set(http.get(rs.WELL_KNOWN_PATH).json())

        # re-serialised through today's JobResult, the same content reads as edited
        reserialised = JobResult.model_validate(signed).model_dump(mode="json")
        assert rs.check_signature(reserialised, keys).outcome == rs.EDITED

        job = http.get(f"/jobs/{job_id}")
        assert job.status_code == 200
        served = job.json()["result"]
        check = rs.check_signature(served, keys)
        assert check.ok, check.message
        assert not set(ADDED_SINCE) & set(served)
        assert served["images"][0]["artifacts"]["recovered"].startswith(f"/jobs/{job_id}/")
        # the report checks the same stored document
        report = http.get(f"/jobs/{job_id}/report.html")
        assert report.status_code == 200
        assert "signature valid" in report.text and "EDITED" not in report.text
