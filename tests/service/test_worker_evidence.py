"""The worker writes the same evidence document as `cgidm check` (cgidm_core.evidence)."""

from __future__ import annotations

import hashlib

import pytest

from cgidm.jobs import InputFile, JobRecord, JobSettings, JobStore, input_key, new_job_id, utcnow
from cgidm.settings import Settings
from cgidm.storage import LocalStorage
from cgidm_core.evidence import build_evidence
from cgidm_testkit.processes import png_bytes
from worker.context import WorkerContext
from worker.job_runner import run_job
from worker.model_cache import ModelCache


@pytest.fixture
def ctx(tmp_path, registry_file) -> WorkerContext:
    from worker.context import _load_pair

    settings = Settings(data_dir=tmp_path, models=registry_file, device="cpu",
                        progress_interval=0)
    return WorkerContext(settings=settings, store=JobStore(LocalStorage(tmp_path / "store")),
                         cache=ModelCache(10**9, _load_pair), worker_id="test-worker")


def test_worker_result_is_the_evidence_document(ctx):
    job_id = new_job_id()
    inputs, files = [], []
    for i, role in enumerate(["image", "image", "control", "control", "control"]):
        name = f"{role}{i}"
        key = input_key(job_id, role, i, name)
        inputs.append(InputFile(name=name, role=role, key=key, width=24, height=20))
        files.append((key, png_bytes(i + 1)))
    record = JobRecord(job_id=job_id, created_at=utcnow(),
                       settings=JobSettings(pretrained="tiny-base", finetuned="tiny-ft", steps=2),
                       inputs=inputs)
    ctx.store.create(record, files)
    assert run_job(ctx, job_id) == "succeeded"
    result = ctx.store.load(job_id).result
    assert result.evidence["score"] == "paired"
    images = [i.model_dump() for i in result.images]
    controls = [c.model_dump() for c in result.controls]
    # the document the library builds from the same per-image values is the one served
    again = build_evidence(images, controls, alpha=ctx.settings.controls_alpha)
    assert [i["p_value"] for i in images] == [i["p_value"] for i in again["images"]]
    assert [i["verdict"] for i in images] == ["inconclusive", "inconclusive"]
    for item in images + controls:
        assert set(item["attack_scores"]) == {"loss", "contrast", "contrast64"}
        assert item["evidence_score"] is not None
    expected = {k: v for k, v in again["set_test"].items() if k not in ("p_values", "verdicts")}
    assert result.controls_test.model_dump() == pytest.approx(expected)


def test_worker_signs_the_result_and_hashes_its_pictures(ctx):
    """The stored result.json and the job's result verify with the published key set; the
    pictures in storage have the signed hashes (docs/EVIDENCE.md)."""
    from cgidm import result_signing as rs
    from cgidm.jobs import artifact_key, job_prefix

    job_id = new_job_id()
    inputs, files = [], []
    for i, role in enumerate(["image", "control"]):
        key = input_key(job_id, role, i, f"{role}{i}")
        data = png_bytes(i + 1)
        inputs.append(InputFile(name=f"{role}{i}", role=role, key=key, width=24, height=20,
                                sha256=hashlib.sha256(data).hexdigest()))
        files.append((key, data))
    record = JobRecord(job_id=job_id, created_at=utcnow(),
                       settings=JobSettings(pretrained="tiny-base", finetuned="tiny-ft", steps=1),
                       inputs=inputs)
    ctx.store.create(record, files)
    assert run_job(ctx, job_id) == "succeeded"
    published = rs.keys_of_set(rs.key_set(rs.load_or_create_key(
        ctx.settings.resolved_signing_key)))
    stored = ctx.store.storage.get_json(job_prefix(job_id) + "result.json")
    check = rs.check_signature(stored, published)
    assert check.ok, check.message
    assert stored["provenance"]["job_id"] == job_id
    loaded = ctx.store.load(job_id)
    assert rs.check_signature(loaded.result.model_dump(mode="json"), published).ok
    for row in stored["images"] + stored["controls"]:
        # the base model's own recovery is stored (on by default) and signed like the others
        assert set(row["picture_sha256"]) == {"recovered", "partial", "side_by_side",
                                              "base_recovered"}
        assert row["artifacts"]["base_recovered"].endswith("/base_recovered.png")
        assert set(row["base_recovery"]) == set(row["metrics"])
        for kind, digest in row["picture_sha256"].items():
            data = ctx.store.storage.get_bytes(artifact_key(job_id, row["name"], kind,
                                                            loaded.attempt))
            assert hashlib.sha256(data).hexdigest() == digest
    # the pictures carry their own C2PA manifest: made by cgidm for this job, from this upload,
    # under a certificate chain whose root key is the published result signing key
    import io

    import c2pa

    assert stored["images"][0]["picture_credentials"] == "c2pa"
    recovered = ctx.store.storage.get_bytes(artifact_key(job_id, "image0", "recovered",
                                                         loaded.attempt))
    with c2pa.Reader("image/png", io.BytesIO(recovered)) as reader:
        manifest = reader.get_active_manifest()
        assert reader.get_validation_state() == "Valid"  # untrusted chain: never "Trusted"
    evidence = next(a["data"] for a in manifest["assertions"]
                    if a["label"] == "org.cgidm.evidence")
    assert evidence == {"job_id": job_id, "picture": "recovered", "image": "image0",
                        "result_signing_key_id": check.key_id,
                        "derived_from_sha256": hashlib.sha256(files[0][1]).hexdigest()}
    assert manifest["claim_generator_info"][0]["name"] == "cgidm"
    assert check.key_id in manifest["signature_info"]["common_name"]

    stored["controls"][0]["score"] += 1e-9
    assert rs.check_signature(stored, published).outcome == rs.EDITED


def test_web_sentence_counts_controls_on_the_score_the_p_value_used():
    """"Recovered better than n of your controls" must agree with the p-value: with the fused
    evidence it counts on evidence_score, not on the similarity shown on the card."""
    from datetime import datetime, timezone

    from app.web import evidence
    from cgidm.jobs import ArtifactLinks, ImageScore, JobResult, SetTest

    links = ArtifactLinks(**{k: f"/x/{k}.png" for k in ("recovered", "partial", "side_by_side")})

    def item(name: str, role: str, similarity: float, fused: float, **kw) -> ImageScore:
        return ImageScore(name=name, role=role, score=similarity, metrics={"ssim": similarity},
                          evidence_score=fused, artifacts=links, **kw)

    # the image's similarity is the lowest, but its evidence beats all 19 controls
    controls = [item(f"c{i}", "control", 0.5 + i / 100, -1.0 - i / 100) for i in range(19)]
    image = item("img", "image", 0.1, 3.0, p_value=0.05, verdict="member_evidence")
    result = JobResult(pretrained="b", finetuned="f", metric="ssim", images=[image],
                       controls=controls, evidence={"score": "fused"},
                       controls_test=SetTest(u_statistic=19, p_value=0.05, auc=1.0, alpha=0.05,
                                             n_suspect=1, n_controls=19))
    record = JobRecord(job_id="0" * 32, status="succeeded",
                       created_at=datetime.now(timezone.utc),
                       settings=JobSettings(pretrained="b", finetuned="f"), result=result)
    card = evidence.build(record, 0.05, {}).cards[0]
    assert card.verdict == "member_evidence"
    assert card.detail.startswith("Recovered better than all 19 of your controls")
    assert card.score == 0.1  # the card still shows the similarity
