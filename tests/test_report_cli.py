"""`cgidm report`: the PDF and HTML evidence report of a `cgidm check` result, checked the way a
reader meets it: rendered to pictures (pdftoppm), its text extracted (pdftotext), its images
listed (pdfimages). Needs Debian's poppler-utils (`make system-deps`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from cgidm.cli import main
from cgidm_testkit.content_credentials import sign_image
from tests.paths import SHARED_DATA, require_shared_data

VANGOGH = SHARED_DATA / "wikiart-vangogh"


def _check(tiny_ddpm_pair, tmp_path):
    for split in ("membership", "hold_out"):
        require_shared_data("wikiart-vangogh", split)
    pre, ft = tiny_ddpm_pair
    images, controls = tmp_path / "images", tmp_path / "controls"
    images.mkdir()
    controls.mkdir()
    for path in sorted((VANGOGH / "membership").glob("*.jpg"))[:2]:
        shutil.copy(path, images / path.name)
    # the first painting carries its artist's C2PA credentials: "AI training not allowed"
    first = sorted(images.iterdir())[0]
    first.write_bytes(sign_image(first.read_bytes(), title=first.name))
    for path in sorted((VANGOGH / "hold_out").glob("*.jpg"))[:3]:
        shutil.copy(path, controls / path.name)
    out = tmp_path / "out"
    assert main(["check", "--pretrained", str(pre), "--finetuned", str(ft), "--steps", "2",
                 "--controls", str(controls), "--out", str(out), str(images)]) == 0
    return out, sorted(p.name for p in images.iterdir())


def _text(pdf, page=None) -> str:
    pages = ["-f", str(page), "-l", str(page)] if page else []
    text = subprocess.run(["pdftotext", *pages, str(pdf), "-"], check=True,
                          capture_output=True, text=True).stdout
    return " ".join(text.split())  # words as a reader sees them, whatever the line breaks


@pytest.mark.slow  # WeasyPrint takes seconds to lay the document out
def test_report_pdf_has_a_cover_a_page_per_image_and_the_method(tiny_ddpm_pair, tmp_path,
                                                                 capsys):
    out, names = _check(tiny_ddpm_pair, tmp_path)
    document = json.loads((out / "results.json").read_text())
    pdf, html = tmp_path / "report.pdf", tmp_path / "report.html"
    assert main(["report", str(out), "--pdf", str(pdf), "--html", str(html)]) == 0
    assert pdf.read_bytes().startswith(b"%PDF")
    info = subprocess.run(["pdfinfo", str(pdf)], check=True, capture_output=True,
                          text=True).stdout
    pages = int(next(line.split()[-1] for line in info.splitlines()
                     if line.startswith("Pages:")))
    # cover, how to read, one page per image, controls, method (and its provenance); the
    # page budget holds with an image's credentials on the cover and its page
    assert 2 + len(names) + 2 <= pages <= 10

    cover = _text(pdf, 1)
    assert "The finding" in cover and "2 images checked" in cover
    assert "Error rate" in cover and "Calibrated on 3 controls" in cover
    assert document["signature"]["key_id"] in cover and "signature valid" in cover
    # the images' own credentials: in the signed result, on the cover and on the image's page
    credentials = document["images"][0]["content_credentials"]
    assert credentials["state"] == "valid_untrusted"
    assert {"label": "cawg.training-mining", "use": "cawg.ai_training",
            "value": "notAllowed"} in credentials["training_mining"]
    assert document["images"][1]["content_credentials"]["state"] == "none"
    assert "signed by Test Artist (Test Artist Studio), say: ai generative training not " \
        "allowed" in cover and "valid but untrusted" in cover
    assert "ai training not allowed" in _text(pdf, 3)
    assert "Content Credentials" not in _text(pdf, 4)
    for number, name in enumerate(names, start=3):  # page 3 on: one image per page
        page = _text(pdf, number)
        assert name in page and "Recovered by the base model alone" in page
        assert "Base model alone: ssim" in page
        assert "have the sha256 recorded in the signed result" in page
    everything = _text(pdf)
    assert "cgidm verify results.json --public-key cgidm-signing-keys.json" in \
        everything.replace(" \\ ", " ")
    assert document["signature"]["digest"] in everything.replace(" ", "")
    weights = document["provenance"]["models"]["finetuned"]["files"][0]["sha256"]
    # hashes wrap inside their table cell (beside the wrapped model path): the start of the
    # hash is on one line of the PDF, the whole of it in the HTML of the same template
    assert weights[:40] in everything
    assert weights in html.read_text()

    # each image page carries its original, masked input and recovery as real images
    listing = subprocess.run(["pdfimages", "-list", str(pdf)], check=True,
                             capture_output=True, text=True).stdout.splitlines()[2:]
    per_page: dict[int, int] = {}
    for line in listing:
        per_page[int(line.split()[0])] = per_page.get(int(line.split()[0]), 0) + 1
    # ... and the base model's own recovery of the same masked input beside the suspect's
    assert all(per_page.get(page) == 4 for page in range(3, 3 + len(names))), per_page
    for row in document["images"]:
        assert (out / row["base_recovered"]).is_file()
        assert set(row["picture_sha256"]) >= {"recovered", "base_recovered"}
        assert set(row["base_recovery"]) == set(row["metrics"])
    assert document["provenance"]["method"]["inversion"]["base_recovery"] is True
    subprocess.run(["pdftoppm", "-r", "30", "-png", "-f", "3", "-l", "3", str(pdf),
                    str(tmp_path / "page")], check=True)
    rendered = list(tmp_path.glob("page-*3.png"))  # page-3.png or page-03.png
    assert len(rendered) == 1 and rendered[0].stat().st_size > 1000

    # the HTML is the same document: self-contained, the same words
    text = html.read_text()
    assert text.count("<img ") == 4 * len(names)
    assert all(src.startswith("data:image/png") for src in re.findall(r'<img[^>]*src="([^"]*)"',
                                                                     text))
    assert "Recovered by the base model alone" in text


def test_report_flags_a_picture_changed_after_signing(tiny_ddpm_pair, tmp_path, capsys):
    out, names = _check(tiny_ddpm_pair, tmp_path)
    record = json.loads((out / "results.json").read_text())["images"][0]
    (out / record["recovered"]).write_bytes((out / record["partial"]).read_bytes())
    html = tmp_path / "r.html"
    assert main(["report", str(out / "results.json"), "--html", str(html)]) == 0
    assert "WARNING: the recovered picture(s) shown differ" in html.read_text()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nowhere"), "--html", str(html)]) == 2
    assert "cannot read it as JSON" in capsys.readouterr().err
