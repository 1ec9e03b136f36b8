"""`cgidm audit` end to end on the shipped demo pair, a model equal to its base, and the real
paintings: the member model is flagged at the top, the non-member model is not."""

from __future__ import annotations

import json

import pytest

from cgidm.cli import main
from cgidm_testkit.audit_family import make_perturbed
from tests.paths import require_shared_data


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    vangogh = require_shared_data("wikiart-vangogh")
    out = tmp_path_factory.mktemp("audit")
    models = out / "models.json"
    # demo-base with noise on its weights: it differs from its base but never saw a painting
    other = make_perturbed(seed=1, cache=out / "family")
    models.write_text(json.dumps([
        {"pretrained": "demo-base", "finetuned": str(other)},
        {"pretrained": "demo-base", "finetuned": "demo-vangogh"},  # fine-tuned on the members
    ]))
    # five members and five hold-outs keep it quick; the decision still has room (below)
    images = [a for p in sorted((vangogh / "membership").iterdir())[:5]
              for a in ("--images", str(p))]
    controls = [a for p in sorted((vangogh / "hold_out").iterdir())[:5]
                for a in ("--controls", str(p))]
    # 10 PGD steps, not fewer: the verdict's paired score averages CGI-DM's objective over the
    # second half of the steps, and over 2 steps (of 4) its noise outweighs the fine-tune
    # (demo-vangogh then gets p = 0.11 here; at 10 steps the members all rank above)
    code = main(["audit", *images, *controls, "--models", str(models),
                 "--out", str(out / "out"), "--steps", "10", "--seed", "0"])
    assert code == 0
    return out / "out", json.loads((out / "out" / "audit.json").read_text())


def test_member_model_is_flagged_first_and_the_base_is_not(audited):
    out, doc = audited
    first, second = doc["models"]
    assert first["finetuned"] == "demo-vangogh" and first["rank"] == 1
    assert first["flagged"] and first["tier"] == "full"
    # 5 members all above 5 hold-outs: exact Mann-Whitney p = 1 / C(10, 5) = 1 / 252; BH over
    # two models with the other p = 1: q = 2 p
    assert first["p_value"] == pytest.approx(1 / 252)
    assert first["q_value"] == pytest.approx(2 / 252)
    assert second["finetuned"].endswith("perturbed-s1-x0.05") and not second["flagged"]
    assert second["q_value"] > 0.05
    assert doc["decision"]["correction"] == "bh" and doc["decision"]["level"] == 0.05
    assert doc["counts"]["models"] == 2 and doc["counts"]["flagged"] == 1


def test_flagged_model_has_per_image_scores_and_pictures(audited):
    out, doc = audited
    first = doc["models"][0]
    assert len(first["images"]) == 5
    for record in first["images"]:
        assert {"evidence_score", "p_value", "screen_score", "attack_scores"} <= set(record)
        pictures = first["pictures"][record["name"]]
        assert (out / pictures["side_by_side"]).is_file()
    assert "pictures" not in doc["models"][1]


def test_bad_model_list_is_one_clear_line(tmp_path, capsys):
    vangogh = require_shared_data("wikiart-vangogh")
    code = main(["audit", "--images", str(vangogh / "membership"),
                 "--controls", str(vangogh / "hold_out"),
                 "--models", '[{"pretrained": "demo-base"}]', "--out", str(tmp_path)])
    assert code == 2
    assert "models[0].finetuned must be a non-empty string" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# the signed audit and its report (issue #28)


def test_audit_is_signed_and_verify_audit_says_when_it_was_edited(audited, tmp_path, capsys):
    import shutil

    from cgidm.audit_signing import SIGNER_CLI
    from cgidm.result_signing import existing_key, public_pem

    out, doc = audited
    key = existing_key()  # the tests' throwaway key (tests/conftest.py), as `cgidm check` uses
    assert doc["signature"]["signer"] == SIGNER_CLI and doc["signature"]["key_id"] == key.key_id
    first = doc["models"][0]
    assert set(first["picture_sha256"]) == set(first["pictures"])
    assert "torch" in doc["software"] and doc["settings"]["inversion"]["seed"] == 0
    assert main(["verify-audit", str(out)]) == 0
    assert "signature valid" in capsys.readouterr().out

    # one byte of the signed document changed: edited after signing (exit 4)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    text = (copy / "audit.json").read_text()
    assert text.count('"demo-vangogh"') == 1
    (copy / "audit.json").write_text(text.replace('"demo-vangogh"', '"demo-vangogi"'))
    assert main(["verify-audit", str(copy / "audit.json")]) == 4
    assert "EDITED AFTER SIGNING" in capsys.readouterr().out
    # the document intact but one byte of a flagged model's picture changed: also exit 4
    (copy / "audit.json").write_text(text)
    picture = copy / next(iter(first["pictures"].values()))["side_by_side"]
    data = bytearray(picture.read_bytes())
    data[-20] ^= 1
    picture.write_bytes(bytes(data))
    assert main(["verify-audit", str(copy)]) == 4
    assert "differs from its signed sha256" in capsys.readouterr().out
    # another key: not signed by this service (exit 3)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = tmp_path / "other.pem"
    other.write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    assert main(["verify-audit", str(out), "--public-key", str(other)]) == 3
    assert "NOT SIGNED BY THIS SERVICE" in capsys.readouterr().out
    # `cgidm verify` on an audit points to verify-audit instead of failing on the format
    assert main(["verify", str(out / "audit.json"), "--signature-only"]) == 2
    assert "cgidm verify-audit" in capsys.readouterr().err


def test_audit_report_pdf_names_the_flagged_model_and_shows_its_pictures(audited, tmp_path):
    import re
    import subprocess

    out, doc = audited
    pdf, html = tmp_path / "audit.pdf", tmp_path / "audit.html"
    assert main(["report", str(out), "--pdf", str(pdf), "--html", str(html)]) == 0
    assert pdf.read_bytes().startswith(b"%PDF")
    subprocess.run(["pdftoppm", "-r", "20", "-png", str(pdf), str(tmp_path / "page")],
                   check=True)
    pages = sorted(tmp_path.glob("page-*.png"))
    # cover, the ranked table, the flagged model's pictures, method and reproduction
    assert len(pages) >= 3 and all(p.stat().st_size > 500 for p in pages)
    text = " ".join(subprocess.run(["pdftotext", str(pdf), "-"], check=True,
                                   capture_output=True, text=True).stdout.split())
    assert "1 of 2 suspect models was flagged" in text and "demo-vangogh" in text
    assert "Benjamini-Hochberg" in text and "0.05" in text
    assert doc["signature"]["digest"] in text.replace(" ", "") or \
        doc["signature"]["key_id"] in text
    assert "signature valid" in text and "cgidm verify-audit audit.json" in text
    # the HTML: self-contained, one picture per image of the one flagged model
    page = html.read_text()
    sources = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(sources) == 5 and all(s.startswith("data:image/png") for s in sources)
    assert page.count("has the sha256 recorded in the signed audit") == 5


# ------------------------------------------------------------------------------------------
# a model that cannot be loaded (issue #27)


@pytest.mark.slow  # builds tiny models and runs one: about 7 s
def test_audit_goes_on_past_models_that_fail_and_exits_partial(tiny_ddpm_pair, tmp_path,
                                                               capsys):
    """A missing path and a fine-tune of another family (flow matching on a DDPM base): each is
    recorded with its error and a note, not ranked, not flagged and out of the correction; the
    good model is audited and ranked alone; exit status 5 (partial)."""
    from cgidm.commands.audit import EXIT_PARTIAL
    from cgidm_core.audit import ERROR_NOTE
    from cgidm_testkit.processes import png_bytes
    from cgidm_testkit.tinymodels import make_tiny_pixel_flow_pair

    pre, ft = tiny_ddpm_pair
    _, flow_ft = make_tiny_pixel_flow_pair(tmp_path / "flow")
    for role, seeds in (("images", (1, 2, 3)), ("controls", (11, 12, 13))):
        (tmp_path / role).mkdir()
        for k in seeds:
            (tmp_path / role / f"{role[0]}{k}.png").write_bytes(png_bytes(k))
    missing = tmp_path / "no-such-model"
    models = [{"pretrained": str(pre), "finetuned": str(missing)},
              {"pretrained": str(pre), "finetuned": str(ft)},
              {"pretrained": str(pre), "finetuned": str(flow_ft)}]
    code = main(["audit", "--images", str(tmp_path / "images"), "--controls",
                 str(tmp_path / "controls"), "--models", json.dumps(models),
                 "--out", str(tmp_path / "out"), "--steps", "2", "--screen-clear-p", "1"])
    captured = capsys.readouterr()
    assert code == EXIT_PARTIAL == 5, captured.err
    assert "2 of 3 model(s) could not be tested" in captured.err
    doc = json.loads((tmp_path / "out" / "audit.json").read_text())
    good, *failed = doc["models"]
    assert good["finetuned"] == str(ft) and good["rank"] == 1 and good["tier"] == "full"
    assert good["q_value"] == pytest.approx(good["p_value"])  # BH over a family of one
    assert [m["finetuned"] for m in failed] == [str(missing), str(flow_ft)]
    for model in failed:
        assert model["tier"] == "error" and model["rank"] is None
        assert model["p_value"] is None and model["q_value"] is None and not model["flagged"]
        assert model["note"] == ERROR_NOTE
    assert "not found" in failed[0]["error"]["message"]
    assert "flow-matching" in failed[1]["error"]["message"]
    assert doc["counts"]["errors"] == 2 and doc["counts"]["models"] == 3
    assert doc["counts"]["flagged"] == 0
    assert "FAILED, not tested" in captured.out  # said as it happened and in the table
    assert main(["verify-audit", str(tmp_path / "out")]) == 0  # signed as usual
