"""The images' own provenance: C2PA Content Credentials read from an image as it was received.

Some rights holders' images carry a C2PA manifest whose training-and-data-mining assertion says
"notAllowed" (``c2pa.training-mining``, the older C2PA label, and ``cawg.training-mining``, the
CAWG one). Next to a positive finding that is a much stronger fact, so every result records, per
image: whether there is a manifest, who signed it, what made it, every training/data-mining entry
with its value, and the validation outcome, read with the ``c2pa-python`` bindings.

Validation is reported as it is, never upgraded:

* ``trusted``: the signature and the content validate and the signer chains to a configured
  trust anchor (cgidm configures none today, so this does not occur yet);
* ``valid_untrusted``: the signature and the content validate, but the signing certificate is
  not on a trust list (self-signed or a private CA): the manifest is intact, and the signer's
  name is what its own certificate claims, not verified by anyone;
* ``invalid``: something fails (content changed after signing, broken signature...): what the
  manifest says cannot be relied on, and the sentence says so;
* ``none``: no manifest; ``unreadable``: the reader failed (the message says why).

Read where the original bytes are: the gateway before it re-encodes an upload as PNG (the PNG
carries no manifest), ``cgidm check`` from the files. Reading is offline: remote manifests and
OCSP are not fetched. Torch-free.
"""

from __future__ import annotations

import io
from typing import Any

#: Assertion labels whose entries say what training and data mining the owner allows.
TRAINING_LABELS = ("c2pa.training-mining", "cawg.training-mining")
_OFFLINE = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff",
         "GIF": "image/gif", "AVIF": "image/avif", "HEIF": "image/heif"}
_VALUES = {"notAllowed": "not allowed", "allowed": "allowed", "constrained": "constrained"}
#: Failure codes that only say the signer is not on a trust list (and OCSP was not asked).
_TRUST_ONLY = {"signingCredential.untrusted"}


def _mime_of(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return _MIME.get(image.format or "")
    except Exception:  # noqa: BLE001 - not an image PIL knows: the reader cannot either
        return None


def _use_name(entry: str) -> str:
    """``cawg.ai_generative_training`` -> ``ai generative training``."""
    return entry.split(".", 1)[-1].replace("_", " ")


def _training_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for assertion in manifest.get("assertions") or []:
        label = str(assertion.get("label", ""))
        base = next((t for t in TRAINING_LABELS if label == t or label.startswith(t + ".")),
                    None)
        if base is None:
            continue
        entries = (assertion.get("data") or {}).get("entries") or {}
        for use, value in entries.items():
            value = value if isinstance(value, dict) else {}
            item = {"label": base, "use": use, "value": value.get("use"),
                    "constraint_info": value.get("constraint_info")}
            out.append({k: v for k, v in item.items() if v is not None})
    return out


def _generator(manifest: dict[str, Any]) -> str | None:
    infos = manifest.get("claim_generator_info") or []
    if infos and isinstance(infos[0], dict) and infos[0].get("name"):
        first = infos[0]
        return f"{first['name']} {first.get('version', '')}".strip()
    return manifest.get("claim_generator")


def _signer(manifest: dict[str, Any]) -> str | None:
    info = manifest.get("signature_info") or {}
    name, issuer = info.get("common_name"), info.get("issuer")
    if name and issuer and issuer != name:
        return f"{name} ({issuer})"
    return name or issuer


def _failures(results: dict[str, Any] | None) -> list[str]:
    active = (results or {}).get("activeManifest") or {}
    return sorted({str(x.get("code")) for x in active.get("failure") or []})


def describe(manifest: dict[str, Any] | None, state: str | None,
             results: dict[str, Any] | None) -> dict[str, Any]:
    """The record of one image's credentials from what the reader returned."""
    if manifest is None:
        return none()
    failures = _failures(results)
    if state == "Trusted":
        kind = "trusted"
        text = "valid: signature and content intact, signer on a trust list"
    elif state == "Valid" and set(failures) <= _TRUST_ONLY:
        kind = "valid_untrusted"
        text = ("valid but untrusted: signature and content intact, but the signing "
                "certificate is not on any trust list (self-signed or a private authority), so "
                "the signer's name is what its own certificate claims")
    else:
        kind = "invalid"
        text = ("does NOT validate (" + (", ".join(failures) or f"state {state}") + "): what "
                "it says cannot be relied on")
    record = {"present": True, "state": kind, "state_text": text,
              "validation_state": state, "failures": failures,
              "claim_generator": _generator(manifest), "signer": _signer(manifest),
              "title": manifest.get("title"), "training_mining": _training_entries(manifest)}
    record["sentence"] = sentence(record)
    return record


def none() -> dict[str, Any]:
    return {"present": False, "state": "none",
            "sentence": "This image carries no Content Credentials (C2PA)."}


def sentence(record: dict[str, Any]) -> str:
    """One plain sentence: who signed, what it says about training, and whether it holds."""
    said = [f"{_use_name(e['use'])} {_VALUES.get(e.get('value'), e.get('value'))}"
            + (f" ({e['constraint_info']})" if e.get("constraint_info") else "")
            for e in record["training_mining"]]
    says = ("say: " + "; ".join(said)) if said else "say nothing about AI training or data mining"
    signer = record.get("signer") or "an unnamed signer"
    if record["state"] == "invalid":
        return (f"This image's Content Credentials (signed by {signer}) {record['state_text']}; "
                f"unvalidated, they {says}.")
    return f"This image's Content Credentials, signed by {signer}, {says} ({record['state_text']})."


def read(data: bytes) -> dict[str, Any]:
    """The credentials of an image given as its bytes, as received."""
    try:
        import c2pa
    except ImportError as exc:  # pragma: no cover - a declared dependency
        return {"present": False, "state": "unreadable",
                "sentence": f"Content Credentials were not read: {exc}."}
    mime = _mime_of(data)
    if mime is None or mime not in c2pa.Reader.get_supported_mime_types():
        return none()
    try:
        context = c2pa.Context(c2pa.Settings.from_dict(_OFFLINE))
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
        if reader is None:
            return none()
        with reader:
            return describe(reader.get_active_manifest(), reader.get_validation_state(),
                            reader.get_validation_results())
    except Exception as exc:  # noqa: BLE001 - c2pa raises many kinds; the record says which
        return {"present": False, "state": "unreadable",
                "sentence": f"This image's Content Credentials could not be read "
                            f"({type(exc).__name__}: {str(exc)[:200]}); nothing is claimed."}
