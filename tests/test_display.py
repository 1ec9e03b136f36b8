"""The recovered picture a person looks at: palette-clamped for display, scored raw."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cgidm.cli import main
from cgidm_core import InversionConfig, authenticate, load_pair
from cgidm_core.errors import ConfigError
from cgidm_core.images import palette_clamp
from tests.paths import require_shared_data


def test_palette_clamp_keeps_kept_pixels_and_bounds_the_rest():
    gen = torch.Generator().manual_seed(0)
    original = torch.rand(2, 3, 8, 8, generator=gen) * 0.5 - 0.25  # palette [-0.25, 0.25]
    recovered = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., ::2, :] = 1.0
    shown = palette_clamp(original, recovered, keep)
    kept = keep.bool().expand_as(original)
    assert torch.equal(shown[kept], recovered[kept])
    for i in range(2):
        for c in range(3):
            visible = original[i, c][kept[i, c]]
            free = shown[i, c][~kept[i, c]]
            assert free.min() >= visible.min() and free.max() <= visible.max()
    # a value already inside its channel's palette is left as it is
    inside = shown == recovered
    assert inside[~kept].any() and not inside.all()


def test_display_changes_the_picture_not_the_scores(tmp_path):
    members = require_shared_data("wikiart-vangogh", "membership")
    pictures = sorted(members.glob("*.jpg"))[:2]
    pair = load_pair("demo-base", "demo-vangogh", device="cpu")
    config = InversionConfig(steps=10, seed=1)
    shown = authenticate(pair, pictures, config=config)
    raw = authenticate(pair, pictures, config=config, display="raw")
    assert shown.provenance["method"]["display"] == "palette_clamp"
    assert raw.provenance["method"]["display"] == "raw"
    for a, b in zip(shown, raw, strict=True):
        assert a.score == b.score and a.metrics == b.metrics
        assert b.recovered_raw is None and a.recovered_raw is not None
        assert np.array_equal(np.asarray(a.recovered_raw), np.asarray(b.recovered))
        # the raw recovery goes off-palette, so the picture shown differs from it
        assert not np.array_equal(np.asarray(a.recovered), np.asarray(b.recovered))
    with pytest.raises(ConfigError, match="display"):
        authenticate(pair, pictures, config=config, display="pretty")


def test_check_cli_writes_the_display_choice(tmp_path, capsys):
    members = require_shared_data("wikiart-vangogh", "membership")
    image = sorted(members.glob("*.jpg"))[0]
    code = main(["check", "--pretrained", "demo-base", "--finetuned", "demo-vangogh",
                 "--steps", "5", "--display", "raw", "--out", str(tmp_path), str(image)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["provenance"]["method"]["display"] == "raw"
