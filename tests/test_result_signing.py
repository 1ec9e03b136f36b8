"""Signed results (cgidm.result_signing) and `cgidm verify`'s answers about the signature."""

from __future__ import annotations

import json

import pytest

from cgidm import result_signing as rs
from cgidm.cli import main

DOCUMENT = {
    "images": [{"name": "a", "score": 0.8125, "p_value": 0.05, "verdict": "member_evidence",
                "artifacts": {"recovered": "/jobs/x/artifacts/a/recovered.png"}}],
    "controls": [{"name": "c", "score": 0.25, "artifacts": {"recovered": "/r.png"}}],
    "settings": {"seed": 0, "prompt": "sks style \u00e9"},
    "provenance": {"inputs": [{"name": "a", "sha256": "ab" * 32}]},
}


@pytest.fixture
def key(tmp_path) -> rs.SigningKey:
    return rs.load_or_create_key(tmp_path / "keys" / "signing-key.pem")


def test_signed_document_checks_and_survives_reformatting(key):
    signed = rs.sign_document(DOCUMENT, key, signer="test")
    keys = {key.key_id: key.public}
    assert rs.check_signature(signed, keys).ok
    again = json.loads(json.dumps(signed, indent=4, sort_keys=True))  # whitespace, key order
    assert rs.check_signature(again, keys).ok
    # the delivery links are not evidence: the gateway signs and expires them
    again["images"][0]["artifacts"]["recovered"] += "?expires=1&signature=x"
    assert rs.check_signature(again, keys).ok
    assert signed["signature"]["digest"] == "sha256:" + rs.content_digest(DOCUMENT)


def test_edits_unknown_keys_and_forgeries_are_told_apart(key, tmp_path):
    signed = rs.sign_document(DOCUMENT, key, signer="test")
    keys = {key.key_id: key.public}
    edited = json.loads(json.dumps(signed))
    edited["images"][0]["score"] = 0.8126
    assert rs.check_signature(edited, keys).outcome == rs.EDITED
    forged = json.loads(json.dumps(signed))
    forged["signature"]["digest"] = "sha256:" + rs.content_digest(edited)
    assert rs.check_signature(forged, keys).outcome == rs.NOT_OURS
    other = rs.load_or_create_key(tmp_path / "other.pem")
    assert rs.check_signature(signed, {other.key_id: other.public}).outcome == rs.NOT_OURS
    assert rs.check_signature(DOCUMENT, keys).outcome == rs.UNSIGNED


def test_key_is_made_once_and_rotation_keeps_the_old_key_published(key):
    assert rs.load_or_create_key(key.path).key_id == key.key_id
    assert oct(key.path.stat().st_mode & 0o777) == "0o600"
    signed = rs.sign_document(DOCUMENT, key, signer="test")
    new, retired = rs.rotate_key(key.path)
    assert retired == key.key_id and new.key_id != key.key_id
    published = rs.key_set(new)
    assert [k["status"] for k in published["keys"]] == ["current", "retired"]
    assert rs.check_signature(signed, rs.keys_of_set(published)).ok


def _write(path, document):
    path.write_text(json.dumps(document, indent=2))
    return path


def test_verify_cli_one_byte_edit_is_edited_after_signing(key, tmp_path, capsys):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(rs.key_set(key)))
    result = _write(tmp_path / "results.json", rs.sign_document(DOCUMENT, key, signer="test"))
    assert main(["verify", str(result), "--public-key", str(keys), "--signature-only"]) == 0
    assert "signature valid" in capsys.readouterr().out

    data = result.read_bytes()
    at = data.index(b"0.8125") + 5
    result.write_bytes(data[:at] + b"6" + data[at + 1:])  # one byte: 0.8125 -> 0.8126
    assert main(["verify", str(result), "--public-key", str(keys), "--signature-only"]) == 4
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("cgidm verify: EDITED AFTER SIGNING")

    data = result.read_bytes().replace(b"0.8126", b"0.8125")
    at = data.index(b'"value": "') + 12
    flipped = b"A" if data[at:at + 1] != b"A" else b"B"
    result.write_bytes(data[:at] + flipped + data[at + 1:])  # one byte of the signature
    assert main(["verify", str(result), "--public-key", str(keys), "--signature-only"]) == 3
    assert "NOT SIGNED BY THIS SERVICE: the signature does not verify" in capsys.readouterr().out

    unsigned = _write(tmp_path / "unsigned.json", DOCUMENT | {"provenance": {"x": 1}})
    assert main(["verify", str(unsigned), "--public-key", str(keys), "--signature-only"]) == 3
    assert "carries no signature" in capsys.readouterr().out


def test_verify_cli_checks_pictures_beside_results(key, tmp_path, capsys):
    picture = tmp_path / "a.recovered.png"
    picture.write_bytes(b"\x89PNG picture")
    document = json.loads(json.dumps(DOCUMENT))
    document["images"][0].update(recovered=picture.name,
                                 picture_sha256={"recovered": rs.file_sha256(picture)})
    result = _write(tmp_path / "results.json", rs.sign_document(document, key, signer="t"))
    keys = tmp_path / "key.pem"
    keys.write_bytes(rs.public_pem(key.public))
    assert main(["verify", str(result), "--public-key", str(keys), "--signature-only"]) == 0
    picture.write_bytes(b"\x89PNG picturf")
    assert main(["verify", str(result), "--public-key", str(keys), "--signature-only"]) == 4
    assert "a.recovered.png (the recovered picture of 'a') differs" in capsys.readouterr().out


def test_keys_commands_make_print_and_rotate(tmp_path, capsys):
    path = tmp_path / "k.pem"
    assert main(["keys", "signing", "--key", str(path)]) == 0
    first = rs.load_or_create_key(path).key_id
    assert f"signing key {first}" in capsys.readouterr().out
    assert main(["keys", "public", "--key", str(path)]) == 0
    published = json.loads(capsys.readouterr().out)
    assert [k["key_id"] for k in published["keys"]] == [first]
    assert main(["keys", "signing", "--key", str(path), "--rotate"]) == 0
    assert f"retired key {first}" in capsys.readouterr().out
    assert main(["keys", "public", "--key", str(path)]) == 0
    assert len(json.loads(capsys.readouterr().out)["keys"]) == 2


def test_verify_without_a_key_for_the_signature_says_it_did_not_check(key, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("CGIDM_SIGNING_KEY", str(tmp_path / "no-local-key.pem"))
    result = _write(tmp_path / "results.json", rs.sign_document(DOCUMENT, key, signer="test"))
    assert main(["verify", str(result), "--signature-only"]) == 2
    assert "--signature-only needs a public key" in capsys.readouterr().err
