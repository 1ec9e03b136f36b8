"""The worker writes the same evidence document as `cgidm check` (cgidm_core.evidence)."""

from __future__ import annotations

import pytest

from cgidm.jobs import InputFile, JobRecord, JobSettings, JobStore, input_key, new_job_id, utcnow
from cgidm.settings import Settings
from cgidm.storage import LocalStorage
from cgidm_core.evidence import build_evidence
from tests.service.conftest import png_bytes
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
    assert result.evidence["score"] == "fused"
    images = [i.model_dump() for i in result.images]
    controls = [c.model_dump() for c in result.controls]
    # the document the library builds from the same per-image values is the one served
    again = build_evidence(images, controls, alpha=ctx.settings.controls_alpha)
    assert [i["p_value"] for i in images] == [i["p_value"] for i in again["images"]]
    assert [i["verdict"] for i in images] == ["inconclusive", "inconclusive"]
    for item in images + controls:
        assert set(item["attack_scores"]) == {"loss", "contrast"}
        assert item["evidence_score"] is not None
    expected = {k: v for k, v in again["set_test"].items() if k not in ("p_values", "verdicts")}
    assert result.controls_test.model_dump() == pytest.approx(expected)
