"""The model registry and the settings object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from cgidm.registry import (
    InvalidModelReference,
    RegistryError,
    UnknownModel,
    check_reference,
    load_registry,
)
from cgidm.settings import Settings, setting_env_names


def test_default_registry_is_the_demo_pair():
    registry = load_registry(None)
    ids = [m.id for m in registry.public()]
    assert ids[:2] == ["demo-base", "demo-vangogh"]  # more demo fine-tunes may follow
    ddpm = [i for i in ids if registry.get(i).family == "ddpm"]
    assert all(registry.get(i).finetuned_from == "demo-base" for i in ddpm[1:])
    base, tuned = registry.check_pair("demo-base", "demo-vangogh")
    assert tuned.finetuned_from == base.id == "demo-base"
    # The flow-matching demo pair is its own family, with its own base.
    assert registry.get("demo-flow-vangogh").finetuned_from == "demo-flow-base"
    # The latent demo family is Stable Diffusion in layout, with its own base.
    assert registry.get("demo-latent-vangogh-lora").finetuned_from == "demo-latent-base"
    assert {registry.get(i).family for i in ids} == {"ddpm", "pixel-flow", "stable-diffusion"}
    with pytest.raises(UnknownModel, match="fine-tuned from 'demo-flow-base'"):
        registry.check_pair("demo-base", "demo-flow-vangogh")


def test_registry_file_resolves_relative_paths_and_reloads(tmp_path: Path):
    (tmp_path / "weights" / "ft").mkdir(parents=True)
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [
        {"id": "base", "family": "ddpm", "path": "/abs/base"},
        {"id": "ft", "family": "ddpm", "path": "weights/ft", "finetuned_from": "base",
         "kind": "dreambooth", "prompt": "sks dog"},
    ]}))
    registry = load_registry(path)
    assert registry.get("ft").path == str((tmp_path / "weights" / "ft").resolve())
    assert registry.get("base").path == "/abs/base"
    assert registry.public()[1].prompt == "sks dog"
    import os

    path.write_text(json.dumps({"models": [{"id": "x", "family": "ddpm", "path": "/x"}]}))
    os.utime(path, ns=(1, 10**18))  # a new mtime: the registry is re-read
    assert [m.id for m in load_registry(path).public()] == ["x"]


@pytest.mark.parametrize("ref", ["../x", "a/b", "/models/x", "C:\\x", "s3://b/k", "~root",
                                 ".hidden", "a..b", "", "x" * 200])
def test_path_like_references_are_refused(ref):
    with pytest.raises(InvalidModelReference):
        check_reference(ref)


def test_unknown_and_mismatched_pairs(tmp_path: Path):
    registry = load_registry(None)
    with pytest.raises(UnknownModel):
        registry.get("sd15")
    with pytest.raises(UnknownModel, match="fine-tuned from 'demo-base'"):
        registry.check_pair("demo-vangogh", "demo-vangogh")


@pytest.mark.parametrize("document", [
    "not json", '{"models": {}}',
    '{"models": [{"id": "a", "family": "ddpm", "path": "/a", "finetuned_from": "b"}]}',
    '{"models": [{"id": "a", "family": "ddpm", "path": "/a"}, {"id": "a", "family": "ddpm", '
    '"path": "/b"}]}',
    '{"models": [{"id": "a", "family": "ddpm", "path": "/a", "remote_code": true}]}',
])
def test_malformed_registry_is_an_operator_error(tmp_path: Path, document: str):
    path = tmp_path / "models.json"
    path.write_text(document)
    with pytest.raises(RegistryError):
        load_registry(path)
    with pytest.raises(RegistryError):
        load_registry(tmp_path / "absent.json")


def test_settings_defaults_are_the_embedded_mode(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("CGIDM_STORAGE_URL", raising=False)
    monkeypatch.delenv("CGIDM_BROKER_URL", raising=False)
    monkeypatch.setenv("CGIDM_DATA_DIR", str(tmp_path / "d"))
    settings = Settings()
    assert settings.resolved_storage_url == (tmp_path / "d" / "storage").as_uri()
    assert settings.resolved_broker_url == f"sqla+sqlite:///{tmp_path / 'd' / 'broker.sqlite'}"
    assert settings.embedded_broker and settings.models is None
    env = settings.as_environment()
    assert env["CGIDM_STORAGE_URL"] == settings.resolved_storage_url
    assert set(env) <= setting_env_names()


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("CGIDM_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("CGIDM_STORAGE_URL", "s3://cgidm/data")
    monkeypatch.setenv("CGIDM_MAX_FILES", "3")
    settings = Settings()
    assert not settings.embedded_broker and settings.max_files == 3
    from cgidm.job_queue import celery_config

    config = celery_config(settings)
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_transport_options"]["visibility_timeout"] > settings.task_time_limit


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.setenv("CGIDM_TASK_SOFT_TIME_LIMIT", "100")
    monkeypatch.setenv("CGIDM_TASK_TIME_LIMIT", "50")
    with pytest.raises(ValidationError, match="CGIDM_TASK_TIME_LIMIT"):
        Settings()


def test_visibility_timeout_must_outlast_the_hard_limit():
    with pytest.raises(ValidationError, match="CGIDM_VISIBILITY_TIMEOUT"):
        Settings(task_soft_time_limit=5, task_time_limit=10, visibility_timeout=10)
    from cgidm.job_queue import celery_config

    settings = Settings(broker_url="redis://x:6379/0", task_soft_time_limit=5,
                        task_time_limit=10, visibility_timeout=30)
    # kombu scans for expired messages every 3 s instead of its default 100 s
    assert celery_config(settings)["broker_transport_options"] == {
        "visibility_timeout": 30, "unacked_restore_interval": 3, "unacked_restore_throttle": 1}
    default = Settings(broker_url="redis://x:6379/0")
    assert default.resolved_visibility_timeout == default.task_time_limit + 600
