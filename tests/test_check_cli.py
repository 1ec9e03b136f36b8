"""`cgidm check` end to end on a tiny pair and the real shared images."""

import json

import pytest
from PIL import Image

from cgidm.cli import main
from tests.paths import SHARED_DATA, require_shared_data

VANGOGH = SHARED_DATA / "wikiart-vangogh"


@pytest.fixture(autouse=True)
def _vangogh() -> None:
    """The tests run on the real paintings: missing, they fail with a message."""
    for split in ("membership", "hold_out"):
        require_shared_data("wikiart-vangogh", split)


def test_check_writes_results_and_pictures(tiny_ddpm_pair, tmp_path, capsys):
    pre, ft = tiny_ddpm_pair
    members = sorted((VANGOGH / "membership").glob("*.jpg"))[:2]
    out = tmp_path / "out"
    code = main(
        ["check", "--pretrained", str(pre), "--finetuned", str(ft), "--steps", "3",
         "--seed", "1", "--batch-size", "2", "--out", str(out), *map(str, members)]
    )
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in doc["images"]] == [m.name for m in members]
    for record in doc["images"]:
        assert isinstance(record["score"], float)
        assert set(record["metrics"]) >= {"ssim", "psnr", "mse"}
        recovered = Image.open(out / record["recovered"])
        assert recovered.size == (16, 16)
        side = Image.open(out / record["side_by_side"])
        assert side.width > 3 * side.height // 2  # three panels side by side
    assert doc["settings"]["inversion"]["steps"] == 3
    assert doc["settings"]["pair"]["family"] == "ddpm"
    printed = capsys.readouterr().out
    assert members[0].name in printed


def test_check_with_controls_gives_p_values_and_a_set_test(tiny_ddpm_pair, tmp_path):
    pre, ft = tiny_ddpm_pair
    members = sorted((VANGOGH / "membership").glob("*.jpg"))[:2]
    controls = tmp_path / "controls"
    controls.mkdir()
    for path in sorted((VANGOGH / "hold_out").glob("*.jpg"))[:3]:
        Image.open(path).save(controls / (path.stem + ".png"))
    out = tmp_path / "out"
    code = main(
        ["check", "--pretrained", str(pre), "--finetuned", str(ft), "--steps", "2",
         "--controls", str(controls), "--out", str(out), *map(str, members)]
    )
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["controls"]) == 3
    for record in doc["images"]:
        assert 0 < record["p_value"] <= 1
        assert record["verdict"] == "inconclusive"  # 3 controls cannot reach alpha
    assert 0 <= doc["set_test"]["p_value"] <= 1


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_missing_model_folder_is_one_clear_line(tmp_path, capsys):
    image = next((VANGOGH / "membership").glob("*.jpg"))
    code = main(["check", "--pretrained", str(tmp_path / "nope"), "--finetuned",
                 str(tmp_path / "nope2"), "--out", str(tmp_path / "o"), str(image)])
    assert code != 0
    assert "nope" in _one_error_line(capsys)


def test_unreadable_image_is_one_clear_line(tiny_ddpm_pair, tmp_path, capsys):
    pre, ft = tiny_ddpm_pair
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    code = main(["check", "--pretrained", str(pre), "--finetuned", str(ft), "--steps", "1",
                 "--out", str(tmp_path / "o"), str(bad)])
    assert code != 0
    assert "bad.png" in _one_error_line(capsys)


def test_missing_image_is_one_clear_line(tiny_ddpm_pair, tmp_path, capsys):
    pre, ft = tiny_ddpm_pair
    code = main(["check", "--pretrained", str(pre), "--finetuned", str(ft),
                 "--out", str(tmp_path / "o"), str(tmp_path / "missing.jpg")])
    assert code != 0
    assert "missing.jpg" in _one_error_line(capsys)


def test_incompatible_pair_is_one_clear_line(tiny_ddpm_pair, tiny_sd_pair, tmp_path, capsys):
    image = next((VANGOGH / "membership").glob("*.jpg"))
    code = main(["check", "--pretrained", str(tiny_ddpm_pair[0]), "--finetuned",
                 str(tiny_sd_pair[1]), "--out", str(tmp_path / "o"), str(image)])
    assert code != 0
    _one_error_line(capsys)


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--metric", "lpips"),
                                        ("--batch-size", "0")])
def test_bad_settings_are_one_clear_line(tiny_ddpm_pair, tmp_path, capsys, flag, value):
    pre, ft = tiny_ddpm_pair
    image = next((VANGOGH / "membership").glob("*.jpg"))
    code = main(["check", "--pretrained", str(pre), "--finetuned", str(ft), flag, value,
                 "--out", str(tmp_path / "o"), str(image)])
    assert code != 0
    _one_error_line(capsys)
