"""The names defined once in ``cgidm_core.names`` are the ones their users accept.

Each front end reads its choices from there (the CLI's ``choices``, the job schema's
``Literal``s); these checks catch a library that learns or drops a choice without the shared
name following, and a copy that creeps back in.
"""

from __future__ import annotations

import dataclasses

from cgidm.jobs import INVERSION_FIELDS, JobSettings
from cgidm.settings import Settings
from cgidm_core import names
from cgidm_core.inversion_config import InversionConfig, preset_config


def _enum(model: type, field: str) -> list[str]:
    schema = model.model_json_schema()["properties"][field]
    return next(option["enum"] for option in schema["anyOf"] if "enum" in option)


def test_the_job_schema_offers_the_shared_choices():
    assert tuple(_enum(JobSettings, "preset")) == names.PRESETS
    assert tuple(_enum(JobSettings, "gradient_checkpointing")) == names.GRADIENT_CHECKPOINTING_MODES
    assert tuple(_enum(JobSettings, "metric")) == names.ALL_METRICS
    assert tuple(_enum(Settings, "dtype")) == names.DTYPES


def test_the_library_accepts_every_shared_choice():
    from cgidm_core.evidence import EVIDENCE_CHOICES, EVIDENCE_COMPONENTS
    from cgidm_core.models.devices import resolve_dtype

    assert set(names.CHECK_EVIDENCE_MODES) <= set(EVIDENCE_CHOICES)
    assert names.DEFAULT_EVIDENCE in EVIDENCE_COMPONENTS
    assert names.DEFAULT_DISPLAY in names.DISPLAY_MODES
    import torch

    for dtype in names.DTYPES:
        assert resolve_dtype(dtype, torch.device("cpu")) == getattr(torch, dtype)
    for mode in names.GRADIENT_CHECKPOINTING_MODES:
        InversionConfig(gradient_checkpointing=mode).validate()


def test_a_preset_and_overrides_are_built_one_way():
    assert preset_config(None) == preset_config("default") == InversionConfig()
    reference = preset_config("reference", {"steps": 7})
    assert reference == dataclasses.replace(InversionConfig.reference(), steps=7)
    # every inversion setting the API takes is a field of the one InversionConfig
    settings = JobSettings(pretrained="a", finetuned="b", preset="reference", steps=9, seed=3)
    assert set(settings.inversion_overrides()) == {"steps", "seed"}
    assert INVERSION_FIELDS & set(JobSettings.model_fields) == {
        "steps", "seed", "alpha", "epsilon", "t_min", "t_max", "mc_samples",
        "common_random_numbers", "reencode_partial", "cell", "resolution",
        "gradient_checkpointing", "base_recovery"}
