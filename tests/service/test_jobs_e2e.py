"""A job through the real stack: gateway -> Redis -> worker -> S3 (moto) -> gateway."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from cgidm_testkit.processes import BUCKET, png_bytes, s3_client, wait_for_job

pytestmark = pytest.mark.slow  # starts servers and processes


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_job_succeeds_with_artifacts_and_result_in_bucket(worker, client, submit, s3_endpoint):
    response = submit(images=[("cat one.png", png_bytes(1)), ("dog.png", png_bytes(2))])
    assert response.status_code == 202, response.text
    accepted = response.json()
    job_id = accepted["job_id"]
    assert accepted["status"] == "queued"
    assert response.headers["location"] == accepted["status_url"] == f"/jobs/{job_id}"

    job = wait_for_job(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["error"] is None
    assert job["progress"]["fraction"] == 1.0 and job["progress"]["steps_total"] == 4
    assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]
    assert job["settings"]["steps"] == 4 and job["owner"] is None
    result = job["result"]
    assert [item["name"] for item in result["images"]] == ["cat-one", "dog"]
    assert result["controls"] == [] and result["controls_test"] is None
    for item in result["images"]:
        assert isinstance(item["score"], float) and "ssim" in item["metrics"]
        assert item["p_value"] is None and item["verdict"] is None
        assert item["nonfinite_gradient_steps"] == 0  # no PGD step skipped on a healthy pair
        for kind, url in item["artifacts"].items():
            picture = client.get(url)
            assert picture.status_code == 200, (kind, picture.text)
            assert picture.headers["content-type"] == "image/png"
            image = Image.open(io.BytesIO(picture.content))
            image.verify()
            assert image.format == "PNG"

    s3 = s3_client(s3_endpoint)
    stored = s3.get_object(Bucket=BUCKET, Key=f"svc/jobs/{job_id}/result.json")["Body"].read()
    import json

    assert json.loads(stored) == result
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET,
                                                 Prefix=f"svc/jobs/{job_id}/")["Contents"]}
    assert f"svc/jobs/{job_id}/inputs/000_cat-one.png" in keys
    assert f"svc/jobs/{job_id}/attempts/{job['attempt']}/artifacts/dog/side_by_side.png" in keys


def test_controls_give_p_values_verdicts_and_set_test(worker, client, submit):
    response = submit(images=[("m1.png", png_bytes(10)), ("m2.png", png_bytes(11))],
                      controls=[("c1.png", png_bytes(20)), ("c2.png", png_bytes(21)),
                                ("c3.png", png_bytes(22))])
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job_id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert len(result["images"]) == 2 and len(result["controls"]) == 3
    for item in result["images"]:
        assert 0 < item["p_value"] <= 1
        assert item["verdict"] == "inconclusive"  # 3 controls cannot reach alpha
    for item in result["controls"]:
        assert item["role"] == "control" and isinstance(item["score"], float)
        assert client.get(item["artifacts"]["recovered"]).status_code == 200
    test = result["controls_test"]
    assert test["n_suspect"] == 2 and test["n_controls"] == 3
    assert 0 <= test["p_value"] <= 1 and 0 <= test["auc"] <= 1 and test["alpha"] == 0.05


def test_second_job_on_same_pair_hits_the_model_cache(worker, client, submit):
    first = wait_for_job(client, submit(finetuned="other-ft", pretrained="other-base")
                         .json()["job_id"])
    before = client.get("/metrics").text
    second = wait_for_job(client, submit(finetuned="other-ft", pretrained="other-base")
                          .json()["job_id"])
    after = client.get("/metrics").text
    assert first["status"] == second["status"] == "succeeded"
    assert second["worker"]["model_cache"] == "hit"
    assert _metric(after, "cgidm_model_cache_hits_total") == \
        _metric(before, "cgidm_model_cache_hits_total") + 1
    assert _metric(after, "cgidm_model_cache_misses_total") == \
        _metric(before, "cgidm_model_cache_misses_total")


def test_cancelling_a_running_job_stops_it(worker, client, submit):
    job_id = submit(steps=5000).json()["job_id"]
    running = wait_for_job(client, job_id, until=lambda j: j["status"] in ("running", "failed")
                           and j["progress"]["steps_done"] > 0 or j["status"] == "failed")
    assert running["status"] == "running", running
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    job = wait_for_job(client, job_id, timeout=30)
    assert job["status"] == "cancelled"
    assert job["result"] is None and job["error"]["code"] == "cancelled"
    assert job["progress"]["steps_done"] < 5000
    name = job["inputs"][0]["name"]
    assert client.get(f"/jobs/{job_id}/artifacts/{name}/recovered.png").status_code == 404
    assert client.delete(f"/jobs/{job_id}").status_code == 200  # idempotent


def test_finished_job_cannot_be_cancelled(worker, client, submit):
    job = wait_for_job(client, submit().json()["job_id"])
    response = client.delete(f"/jobs/{job['job_id']}")
    assert response.status_code == 409
    assert response.json()["detail"][0]["loc"] == ["path", "job_id"]


def test_metrics_readiness_and_models(worker, client):
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"storage": "ok", "broker": "ok"}
    text = client.get("/metrics").text
    assert _metric(text, "cgidm_broker_up") == 1 and _metric(text, "cgidm_storage_up") == 1
    assert 'cgidm_jobs{state="succeeded"}' in text
    assert "cgidm_job_duration_seconds_bucket" in text and "cgidm_queue_depth" in text
    models = client.get("/models").json()["models"]
    assert {m["id"] for m in models} == {"tiny-base", "tiny-ft", "other-base", "other-ft",
                                         "missing-ft", "corrupt-ft"}
    assert all("path" not in m for m in models)
