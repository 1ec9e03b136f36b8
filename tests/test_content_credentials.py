"""C2PA Content Credentials of submitted images (cgidm.content_credentials), on images the tests
sign themselves with a throwaway certificate chain: valid, tampered, none."""

from __future__ import annotations

from cgidm import content_credentials
from cgidm_testkit.content_credentials import jpeg, sign_image, tampered


def test_a_signed_image_says_training_not_allowed_valid_but_untrusted():
    record = content_credentials.read(sign_image(jpeg(1)))
    assert record["present"] and record["state"] == "valid_untrusted"
    assert record["validation_state"] == "Valid"
    assert record["failures"] == ["signingCredential.untrusted"]
    assert record["signer"] == "Test Artist (Test Artist Studio)"
    assert record["claim_generator"] == "test-artist-camera 1.0"
    entries = {(e["label"], e["use"]): e for e in record["training_mining"]}
    assert entries["cawg.training-mining", "cawg.ai_training"]["value"] == "notAllowed"
    assert entries["c2pa.training-mining", "c2pa.ai_generative_training"]["value"] == \
        "notAllowed"
    assert entries["cawg.training-mining", "cawg.data_mining"]["constraint_info"] == \
        "ask the artist"
    assert "signed by Test Artist (Test Artist Studio)" in record["sentence"]
    assert "ai training not allowed" in record["sentence"]
    assert "valid but untrusted" in record["sentence"]


def test_a_tampered_image_is_never_reported_as_valid():
    record = content_credentials.read(tampered(sign_image(jpeg(2))))
    assert record["present"] and record["state"] == "invalid"
    assert record["validation_state"] == "Invalid"
    assert set(record["failures"]) - {"signingCredential.untrusted"}  # a real failure
    assert "does NOT validate" in record["sentence"] and "unvalidated" in record["sentence"]
    assert "valid but" not in record["sentence"]


def test_images_without_credentials_and_non_images():
    assert content_credentials.read(jpeg(3)) == content_credentials.none()
    assert content_credentials.read(b"not an image")["state"] == "none"


def test_png_credentials_are_read_too():
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(out, format="PNG")
    record = content_credentials.read(sign_image(out.getvalue(), "image/png"))
    assert record["state"] == "valid_untrusted"
