"""Provenance in `cgidm check` results, and `cgidm verify` re-running them."""

from __future__ import annotations

import hashlib
import json
import shutil

from cgidm.cli import main
from tests.paths import SHARED_DATA, require_shared_data

VANGOGH = SHARED_DATA / "wikiart-vangogh"


def _record(tiny_ddpm_pair, tmp_path):
    for split in ("membership", "hold_out"):
        require_shared_data("wikiart-vangogh", split)
    pre, ft = tiny_ddpm_pair
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((VANGOGH / "membership").glob("*.jpg"))[:2]:
        shutil.copy(path, images / path.name)
    controls = tmp_path / "controls"
    controls.mkdir()
    for path in sorted((VANGOGH / "hold_out").glob("*.jpg"))[:2]:
        shutil.copy(path, controls / path.name)
    out = tmp_path / "out"
    assert main(["check", "--pretrained", str(pre), "--finetuned", str(ft), "--steps", "3",
                 "--seed", "5", "--prompt", "ignored by pixel models", "--controls",
                 str(controls), "--out", str(out), str(images)]) == 0
    return out / "results.json", images, controls


def test_results_carry_provenance(tiny_ddpm_pair, tmp_path):
    results, images, controls = _record(tiny_ddpm_pair, tmp_path)
    record = json.loads(results.read_text())["provenance"]
    files = sorted(images.iterdir()) + sorted(controls.iterdir())
    assert [i["sha256"] for i in record["inputs"]] == \
        [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert [i["name"] for i in record["inputs"]] == [f.name for f in files]
    pre, ft = tiny_ddpm_pair
    weights = ft / "unet" / "diffusion_pytorch_model.safetensors"
    tuned = {f["path"]: f["sha256"] for f in record["models"]["finetuned"]["files"]}
    assert tuned["unet/diffusion_pytorch_model.safetensors"] == \
        hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "unet/config.json" in tuned and record["models"]["pretrained"]["path"] == str(pre)
    # pixel models have no text: the prompt given is ignored and recorded as such
    assert record["prompt"] is None and record["prompt_source"] == "unconditional"
    assert record["method"]["seed"] == 5 and record["method"]["inversion"]["steps"] == 3
    assert record["device"] == "cpu" and record["dtype"] == "float32"
    software = record["software"]
    assert software["torch"] and software["diffusers"] and software["cgidm"]
    assert software["git"] is None or len(software["git"]["commit"]) == 40


def test_verify_reproduces_an_unchanged_record(tiny_ddpm_pair, tmp_path, capsys):
    results, images, controls = _record(tiny_ddpm_pair, tmp_path)
    capsys.readouterr()
    assert main(["verify", str(results), "--images", str(images),
                 "--images", str(controls)]) == 0
    printed = capsys.readouterr().out
    assert "match the record" in printed and "VERIFIED on cpu/float32" in printed
    assert printed.count("e-") + printed.count("e+") >= 4  # one difference per input


def test_verify_refuses_a_changed_image_or_model(tiny_ddpm_pair, tmp_path, capsys):
    results, images, controls = _record(tiny_ddpm_pair, tmp_path)
    victim = sorted(images.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")  # one byte of one painting
    capsys.readouterr()
    assert main(["verify", str(results), "--images", str(images),
                 "--images", str(controls)]) == 2
    printed = capsys.readouterr().out
    assert "REFUSED" in printed and victim.name in printed and "differs" in printed

    shutil.copy(VANGOGH / "membership" / victim.name, victim)  # the image is restored...
    pre, ft = tiny_ddpm_pair
    copy = tmp_path / "model-copy"
    shutil.copytree(ft, copy)
    config = copy / "unet" / "config.json"
    config.write_text(config.read_text().replace("{", "{ ", 1))  # ...but the model differs
    assert main(["verify", str(results), "--images", str(images), "--images", str(controls),
                 "--finetuned", str(copy)]) == 2
    printed = capsys.readouterr().out
    assert "finetuned model differs" in printed and "unet/config.json" in printed


def test_verify_checks_the_signature_before_re_running(tiny_ddpm_pair, tmp_path, capsys):
    """A signed `cgidm check` result: a one-byte edit is "edited after signing" (exit 4) and
    another service's key "not signed by this service" (exit 3), both before any model loads."""
    from cgidm import result_signing

    results, images, controls = _record(tiny_ddpm_pair, tmp_path)
    signature = json.loads(results.read_text())["signature"]
    assert signature["key_id"] == result_signing.load_or_create_key().key_id
    capsys.readouterr()
    assert main(["keys", "public"]) == 0
    keys = tmp_path / "keys.json"
    keys.write_text(capsys.readouterr().out)
    text = results.read_text()
    at = text.index('"seconds": ') + len('"seconds": ')
    edited = text[:at] + ("9" if text[at] != "9" else "8") + text[at + 1:]  # one byte
    results.write_text(edited)
    assert main(["verify", str(results), "--public-key", str(keys), "--images", str(images),
                 "--images", str(controls)]) == 4
    assert capsys.readouterr().out.startswith("cgidm verify: EDITED AFTER SIGNING")
    results.write_text(text)
    stranger = tmp_path / "stranger.pem"
    result_signing.load_or_create_key(stranger)
    assert main(["verify", str(results), "--public-key", str(stranger), "--signature-only"]) == 3
    assert "NOT SIGNED BY THIS SERVICE: signed with key" in capsys.readouterr().out
    assert main(["verify", str(results), "--public-key", str(keys), "--signature-only"]) == 0
