"""Pixel LoRA uploads (#27): a LoRA file of a pixel base (diffusers ``unet.*.lora_A/B`` or kohya
``lora_unet_*``, as :func:`cgidm_core.pixel_lora.save_lora` writes them) is taken by
``POST /models`` against a pixel base, checked against the family registry's key signatures,
and usable in jobs and audits; a LoRA of another family is refused. Through a real worker, an
audit of the uploaded LoRA swaps it on the loaded base (worker/audit_swap.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from cgidm_testkit.processes import png_bytes, wait_until
from cgidm_testkit.tinymodels import randomize_lora_b

IMAGES = [("images", (f"i{k}.png", png_bytes(k), "image/png")) for k in (1, 2)]
CONTROLS = [("controls", (f"c{k}.png", png_bytes(k), "image/png")) for k in (11, 12)]


def _tiny_base(registry_file: Path) -> Path:
    entries = json.loads(registry_file.read_text())["models"]
    return Path(next(e["path"] for e in entries if e["id"] == "tiny-base"))


@pytest.fixture(scope="module")
def pixel_lora(registry_file, tmp_path_factory) -> tuple[Path, Path]:
    """A rank-2 attention + convolution LoRA of tiny-base's UNet with seeded random B matrices
    (peft starts them at 0), as (diffusers file, kohya file)."""
    from cgidm_core.pixel_lora import PixelLoraRecipe, add_lora, save_lora
    from cgidm_core.training import load_pipeline_parts

    unet, _ = load_pipeline_parts(_tiny_base(registry_file))
    recipe = PixelLoraRecipe(rank=2, targets="attn_conv")
    add_lora(unet, recipe)
    randomize_lora_b(unet, torch.Generator().manual_seed(0), scale=0.05)
    return save_lora(unet, recipe, tmp_path_factory.mktemp("pixel_lora"))


def _upload(http, data: bytes, name: str, **fields: str):
    return http.post("/models", data={"finetuned_from": "tiny-base", **fields},
                     files={"file": (name, data)})


def test_a_pixel_lora_upload_is_taken_and_usable_in_jobs_and_audits(app_client, pixel_lora):
    """Both layouts are taken as ``lora`` uploads of the DDPM base (the kind said or detected);
    a job and an audit naming the upload are accepted; an SD LoRA (cross-attention names) is a
    422 ``family_mismatch`` that names both families."""
    ids = []
    for path, kind in zip(pixel_lora, ({}, {"kind": "lora"}), strict=True):
        response = _upload(app_client, path.read_bytes(), path.name, **kind)
        assert response.status_code == 201, response.text
        model = response.json()
        assert (model["kind"], model["family"], model["finetuned_from"]) == \
            ("lora", "ddpm", "tiny-base")
        ids.append(model["id"])
    listed = {m["id"]: m for m in app_client.get("/models").json()["models"]}
    assert all(listed[i]["uploaded"] for i in ids)
    job = app_client.post("/authenticate", data={
        "pretrained": "tiny-base", "finetuned": ids[0], "steps": "2"},
        files=[("images", ("a.png", png_bytes(1), "image/png"))])
    assert job.status_code == 202, job.text
    audit = app_client.post("/audits", files=IMAGES + CONTROLS, data={
        "models": json.dumps([{"pretrained": "tiny-base", "finetuned": i} for i in ids]),
        "steps": "2"})
    assert audit.status_code == 202, audit.text
    assert app_client.delete(f"/audits/{audit.json()['audit_id']}").status_code == 202

    sd_lora = {f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.{p}.lora_{ab}.weight":
               np.zeros((2, 2), dtype=np.float32) for p in ("to_k", "to_v") for ab in "AB"}
    refused = _upload(app_client, save(sd_lora), "sd_lora.safetensors")
    assert refused.status_code == 422, refused.text
    [detail] = refused.json()["detail"]
    assert detail["type"] == "family_mismatch" and detail["loc"] == ["body", "file"]
    assert "pixel-space DDPM" in detail["msg"] and "Stable Diffusion 1.x/2.x" in detail["msg"]


@pytest.mark.slow  # starts servers and processes
def test_an_uploaded_pixel_lora_is_audited_by_the_worker_swapped_on_its_base(
        worker, client, pixel_lora, service_root):
    """The kohya file uploaded, then audited through the real stack: the model gets its entry,
    and the worker attached the upload to the loaded base (its log's swap count) instead of
    loading a pair for it (a job's loading of an upload: tests/test_lora_swap.py)."""
    response = _upload(client, pixel_lora[1].read_bytes(), "kohya.safetensors")
    assert response.status_code in (200, 201), response.text
    upload_id = response.json()["id"]
    log = service_root / "worker.log"
    start = log.stat().st_size
    models = [{"pretrained": "tiny-base", "finetuned": upload_id}]
    submitted = client.post("/audits", files=IMAGES[:1] + CONTROLS[:1], data={
        "models": json.dumps(models), "steps": "2"})
    assert submitted.status_code == 202, submitted.text
    audit_id = submitted.json()["audit_id"]
    audit = wait_until(lambda: (lambda a: a if a["status"] in ("succeeded", "failed") else None)(
        client.get(f"/audits/{audit_id}").json()), 60, f"audit {audit_id}")
    assert audit["status"] == "succeeded", audit
    [entry] = audit["result"]["models"]
    assert entry["finetuned"] == upload_id and entry["tier"] != "error", entry
    assert 0 < entry["p_value"] <= 1
    assert f"audit {audit_id}: 1 LoRA(s) swapped on a loaded base" in \
        log.read_bytes()[start:].decode(errors="replace")
