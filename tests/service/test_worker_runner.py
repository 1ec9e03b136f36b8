"""The worker's job runner in-process: time limits, shutdown requeue, redelivered messages."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from cgidm.jobs import (
    InputFile,
    JobRecord,
    JobSettings,
    JobStore,
    input_key,
    job_prefix,
    new_job_id,
    utcnow,
)
from cgidm.leases import Step
from cgidm.settings import Settings
from cgidm.storage import LocalStorage
from cgidm_testkit.processes import png_bytes
from worker.context import WorkerContext
from worker.job_runner import SHUTDOWN, HardLimit, JobInterrupted, run_job
from worker.model_cache import ModelCache


@pytest.fixture
def ctx(tmp_path, registry_file, request) -> WorkerContext:
    """A worker context; the hard limit is short only where a test asks for it (indirect
    parameter), since elsewhere it could end the test process itself."""
    from worker.context import _load_pair

    hard = getattr(request, "param", 600)
    # The soft limit counts from the job's start, model loading included (1.6 s on a loaded
    # 2-core machine): 5 s leaves steps before it fires, so "between steps" is what is tested.
    settings = Settings(data_dir=tmp_path, models=registry_file, device="cpu",
                        task_soft_time_limit=min(5, hard - 1), task_time_limit=hard,
                        progress_interval=0)
    return WorkerContext(settings=settings, store=JobStore(LocalStorage(tmp_path / "store")),
                         cache=ModelCache(10**9, _load_pair), worker_id="test-worker")


def _queue_job(ctx: WorkerContext, steps: int) -> JobRecord:
    job_id = new_job_id()
    key = input_key(job_id, "image", 0, "a")
    record = JobRecord(job_id=job_id, created_at=utcnow(),
                       settings=JobSettings(pretrained="tiny-base", finetuned="tiny-ft",
                                            steps=steps),
                       inputs=[InputFile(name="a", role="image", key=key, width=24, height=20)])
    ctx.store.create(record, [(key, png_bytes(7))])
    return record


def test_soft_time_limit_fails_the_job_between_steps(ctx, monkeypatch):
    monkeypatch.setenv("CGIDM_DEVICE", "cpu")
    record = _queue_job(ctx, steps=10_000)
    started = time.monotonic()
    assert run_job(ctx, record.job_id) == "failed"
    assert time.monotonic() - started < 30
    job = ctx.store.load(record.job_id)
    assert job.error.code == "time_limit" and "CGIDM_TASK_SOFT_TIME_LIMIT" in job.error.message
    assert 0 < job.progress.steps_done < 10_000 and job.result is None
    assert ctx.store.load_worker_stats()[0]["jobs"] == {"failed": 1}


@pytest.mark.parametrize("ctx", [2], indirect=True)
def test_hard_limit_records_the_failure_then_exits(ctx):
    record = _queue_job(ctx, steps=4)
    codes: list[int] = []
    with HardLimit(ctx, record, exit=codes.append):
        time.sleep(2.6)  # a step that never returns
    assert codes == [HardLimit.EXIT_CODE]
    job = ctx.store.load(record.job_id)
    assert job.status == "failed" and job.error.code == "time_limit"


def test_shutdown_leaves_the_job_queued_for_redelivery(ctx):
    record = _queue_job(ctx, steps=4)
    SHUTDOWN.set()
    try:
        with pytest.raises(JobInterrupted):
            run_job(ctx, record.job_id)
    finally:
        SHUTDOWN.clear()
    job = ctx.store.load(record.job_id)
    assert job.status == "queued" and job.attempts == 0


def test_redelivered_or_orphan_messages_are_harmless(ctx):
    assert run_job(ctx, new_job_id()) == "missing"
    record = _queue_job(ctx, steps=4)
    ctx.store.request_cancel(record.job_id)
    assert run_job(ctx, record.job_id) == "cancelled"
    finished = ctx.store.load(record.job_id)
    assert run_job(ctx, record.job_id) == "cancelled"  # second delivery: nothing rewritten
    assert ctx.store.load(record.job_id) == finished


@pytest.fixture(scope="module")
def sd_registry(tmp_path_factory):
    """A tiny Stable Diffusion pair (real CLIP tokenizer of 77 tokens) in a registry."""
    import json

    from cgidm_testkit import tinymodels

    root = tmp_path_factory.mktemp("sd")
    base = tinymodels.make_tiny_sd(root / "base")
    tuned = tinymodels.make_full_finetune(base, root / "ft")
    path = root / "models.json"
    path.write_text(json.dumps({"models": [
        {"id": "sd-base", "family": "stable-diffusion", "path": str(base)},
        {"id": "sd-ft", "family": "stable-diffusion", "path": str(tuned),
         "finetuned_from": "sd-base", "prompt": "sks style"}]}))
    return path


def test_prompt_longer_than_the_tokenizer_fails_the_job_with_its_code(tmp_path, sd_registry):
    """The gateway bounds words (75); the worker counts the model's real tokens, because the
    text encoder would otherwise cut the prompt silently and the evidence would be about a
    prompt the user never gave."""
    from worker.context import _load_pair

    settings = Settings(data_dir=tmp_path, models=sd_registry, device="cpu", progress_interval=0)
    ctx = WorkerContext(settings=settings, store=JobStore(LocalStorage(tmp_path / "store")),
                        cache=ModelCache(10**9, _load_pair), worker_id="test-worker")
    long_prompt = " ".join(["antidisestablishmentarianism"] * 20)  # 20 words, hundreds of tokens
    outcomes = {}
    for label, prompt in (("long", long_prompt), ("fits", "a painting in sks style")):
        job_id = new_job_id()
        key = input_key(job_id, "image", 0, "a")
        record = JobRecord(job_id=job_id, created_at=utcnow(),
                           settings=JobSettings(pretrained="sd-base", finetuned="sd-ft", steps=1,
                                                prompt=prompt),
                           inputs=[InputFile(name="a", role="image", key=key, width=24,
                                             height=20)])
        ctx.store.create(record, [(key, png_bytes(8))])
        assert run_job(ctx, job_id) in ("failed", "succeeded")
        outcomes[label] = ctx.store.load(job_id)
    assert outcomes["long"].status == "failed"
    assert outcomes["long"].error.code == "prompt_too_long"
    assert "at most 77" in outcomes["long"].error.message
    assert outcomes["fits"].status == "succeeded", outcomes["fits"].error


def _job_with_images(ctx: WorkerContext, count: int, **settings: object) -> JobRecord:
    job_id = new_job_id()
    inputs, files = [], []
    for i in range(count):
        key = input_key(job_id, "image", i, f"p{i}")
        inputs.append(InputFile(name=f"p{i}", role="image", key=key, width=24, height=20))
        files.append((key, png_bytes(20 + i)))
    record = JobRecord(job_id=job_id, created_at=utcnow(), inputs=inputs,
                       settings=JobSettings(pretrained="tiny-base", finetuned="tiny-ft",
                                            **settings))
    ctx.store.create(record, files)
    return record


@pytest.fixture
def leased_ctx(tmp_path, registry_file) -> WorkerContext:
    """A worker context with the embedded service's lease store (SQLite) and room for jobs."""
    from cgidm.leases import SqliteLeases
    from worker.context import _load_pair

    settings = Settings(data_dir=tmp_path, models=registry_file, device="cpu",
                        task_soft_time_limit=300, task_time_limit=600, progress_interval=0)
    return WorkerContext(settings=settings, store=JobStore(LocalStorage(tmp_path / "store")),
                         cache=ModelCache(10**9, _load_pair), worker_id="test-worker",
                         leases=SqliteLeases(settings))


def test_out_of_memory_in_a_job_halves_the_batch_and_records_it(leased_ctx, monkeypatch):
    """CUDA's out-of-memory error injected for batches above one image: the job succeeds and
    its result says which batch size it ended with."""
    import torch

    import cgidm_core.api

    real = cgidm_core.api.invert

    def invert(pair, tensor, *args, **kwargs):
        if tensor.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(pair, tensor, *args, **kwargs)

    monkeypatch.setattr(cgidm_core.api, "invert", invert)
    record = _job_with_images(leased_ctx, 4, steps=2, batch_size=4)
    assert run_job(leased_ctx, record.job_id, 1) == "succeeded"
    job = leased_ctx.store.load(record.job_id)
    assert job.result.batch_size_used == 1 and job.result.oom_halvings == 2
    assert len(job.result.images) == 4
    published = leased_ctx.store.storage.get_json(job_prefix(record.job_id) + "result.json")
    assert published["batch_size_used"] == 1


def test_batch_size_used_without_out_of_memory(leased_ctx):
    record = _job_with_images(leased_ctx, 3, steps=1, batch_size=2)
    assert run_job(leased_ctx, record.job_id, 1) == "succeeded"
    result = leased_ctx.store.load(record.job_id).result
    assert (result.batch_size_used, result.oom_halvings) == (2, 0)


def test_superseded_and_duplicate_deliveries_do_nothing(leased_ctx):
    """Attempt 1 was lost and attempt 2 handed out: a late delivery of attempt 1 is dropped
    without touching the record; attempt 2 runs; a duplicate of attempt 2 afterwards is
    dropped too (the job has finished). One result, one run folder."""
    leases = leased_ctx.leases
    record = _job_with_images(leased_ctx, 1, steps=1)
    job_id = record.job_id
    assert leases.claim(job_id, 1, "lost-worker").ok
    leases._apply(job_id, lambda lease, now: Step(replace(lease, deadline=now - 1)))  # lapsed
    reaped = leases.reap(job_id, "reaper")
    assert reaped.attempt == 2 and leases.settle(reaped, "reaper")
    before = leased_ctx.store.load(job_id)
    assert run_job(leased_ctx, job_id, 1) == "stale"
    assert leased_ctx.store.load(job_id) == before
    assert run_job(leased_ctx, job_id, 2) == "succeeded"
    assert run_job(leased_ctx, job_id, 2) == "succeeded"  # finished: skipped
    job = leased_ctx.store.load(job_id)
    assert job.attempts == 1 and job.worker["delivery"] == 2
    assert leased_ctx.store.list_attempts(job_id) == [job.attempt]
    assert leases.get(job_id).state == "done"


@pytest.fixture(scope="module")
def sdxl_registry(tmp_path_factory):
    """A tiny SDXL base, a kohya LoRA with ss_* metadata and a plain DreamBooth folder."""
    import json

    from cgidm_testkit import tinymodels

    root = tmp_path_factory.mktemp("sdxl")
    base = tinymodels.make_tiny_sdxl(root / "base")
    lora = tinymodels.make_sdxl_kohya_lora(
        base, root / "lora.safetensors",
        metadata={"ss_tag_frequency": json.dumps({"5_zzvg": {"zzvg": 5, "tree": 1}})})
    plain = tinymodels.make_dreambooth_folder(base, root / "db", ())
    path = root / "models.json"
    path.write_text(json.dumps({"models": [
        {"id": "xl-base", "family": "stable-diffusion-xl", "path": str(base)},
        {"id": "xl-lora", "family": "stable-diffusion-xl", "path": str(lora),
         "finetuned_from": "xl-base", "kind": "lora"},
        {"id": "xl-db", "family": "stable-diffusion-xl", "path": str(plain),
         "finetuned_from": "xl-base", "kind": "dreambooth", "prompt": "sks style"},
        {"id": "xl-db-plain", "family": "stable-diffusion-xl", "path": str(plain),
         "finetuned_from": "xl-base", "kind": "dreambooth"}]}))
    return path


def test_sdxl_jobs_record_the_prompt_and_its_source(tmp_path, sdxl_registry):
    """The API result says which prompt was used and where it came from (given > registry >
    the fine-tune's metadata > empty with a warning)."""
    from worker.context import _load_pair

    settings = Settings(data_dir=tmp_path, models=sdxl_registry, device="cpu",
                        progress_interval=0)
    ctx = WorkerContext(settings=settings, store=JobStore(LocalStorage(tmp_path / "store")),
                        cache=ModelCache(10**9, _load_pair), worker_id="test-worker")
    cases = {
        "metadata": ("xl-lora", None, ("zzvg", "safetensors_metadata")),
        "given": ("xl-lora", "a tree", ("a tree", "given")),
        "registry": ("xl-db", None, ("sks style", "registry")),
        "empty": ("xl-db-plain", None, ("", "empty")),
    }
    for finetuned, prompt, expected in cases.values():
        job_id = new_job_id()
        key = input_key(job_id, "image", 0, "a")
        record = JobRecord(job_id=job_id, created_at=utcnow(),
                           settings=JobSettings(pretrained="xl-base", finetuned=finetuned,
                                                steps=1, prompt=prompt, resolution=32),
                           inputs=[InputFile(name="a", role="image", key=key, width=24,
                                             height=20)])
        ctx.store.create(record, [(key, png_bytes(8))])
        assert run_job(ctx, job_id) == "succeeded", ctx.store.load(job_id).error
        result = ctx.store.load(job_id).result
        assert (result.prompt, result.prompt_source) == expected
        assert result.pair["family"] == "stable-diffusion-xl"
        assert result.config["resolution"] == 32
        assert (result.prompt_warning is not None) == (expected[1] == "empty")


def test_uploaded_unet_weights_load_on_a_demo_base(tmp_path):
    """The built-in registry's base path is a demo name ("demo-base"), not a folder: the UNet
    config the upload's view needs comes from the packaged model (was FileNotFoundError)."""
    import hashlib

    from cgidm.registry import DEMO_ENTRIES
    from cgidm.uploaded_models import UploadedModel
    from cgidm_core.demo import DEMO_MODELS_DIR
    from worker.context import _load_pair
    from worker.disk_cache import DiskCache

    data = (DEMO_MODELS_DIR / "demo-vangogh-light" / "unet"
            / "diffusion_pytorch_model.safetensors").read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    storage = LocalStorage(tmp_path / "store")
    storage.put_bytes("uploads/suspect.safetensors", data)
    ctx = WorkerContext(settings=Settings(data_dir=tmp_path, device="cpu"),
                        store=JobStore(storage), cache=ModelCache(10**9, _load_pair),
                        worker_id="test-worker", disk=DiskCache(tmp_path / "disk", 10**9))
    base = next(e for e in DEMO_ENTRIES if e.id == "demo-base")
    upload = UploadedModel(id="up-" + "0" * 24, sha256=sha256, kind="unet", family="ddpm",
                           finetuned_from="demo-base", size_bytes=len(data), prompt_source="none",
                           created_at=utcnow(), blob_key="uploads/suspect.safetensors")
    pair = _load_pair(ctx.pair_key(base, upload), ctx)
    assert pair.family == "ddpm" and pair.image_size == 32
