"""Images with C2PA Content Credentials made at test time: a throwaway certificate chain (a root
authority and a signing certificate, ECDSA P-256, made with ``cryptography``) signs a manifest
with training-and-data-mining assertions into a JPEG or PNG through ``c2pa-python``. Nothing is
downloaded; the chain is on no trust list, so its manifests read as valid but untrusted."""

from __future__ import annotations

import datetime
import functools
import io
from typing import Any

#: What the tests' artist says about training: not allowed, in both labels.
NOT_ALLOWED = {
    "cawg.training-mining": {"cawg.ai_generative_training": {"use": "notAllowed"},
                             "cawg.ai_training": {"use": "notAllowed"},
                             "cawg.data_mining": {"use": "constrained",
                                                  "constraint_info": "ask the artist"}},
    "c2pa.training-mining": {"c2pa.ai_generative_training": {"use": "notAllowed"}},
}


@functools.lru_cache(maxsize=1)
def throwaway_chain() -> tuple[bytes, bytes]:
    """(PEM certificate chain, signing certificate first; PEM private key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Artist Studio")])

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False,
                             key_encipherment=False, data_encipherment=False,
                             key_agreement=False, key_cert_sign=not sign, crl_sign=not sign,
                             encipher_only=False, decipher_only=False)

    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(name("Test Root Authority"))
            .issuer_name(name("Test Root Authority")).public_key(root_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage(False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()),
                           critical=False)
            .sign(root_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("Test Artist")).issuer_name(root.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    chain = leaf.public_bytes(pem) + root.public_bytes(pem)
    private = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return chain, private


def sign_image(image: bytes, mime: str = "image/jpeg",
               training: dict[str, Any] | None = None, title: str = "painting") -> bytes:
    """``image`` with a signed C2PA manifest: created by a camera, with ``training``
    assertions (default ``NOT_ALLOWED``)."""
    import c2pa

    chain, private = throwaway_chain()
    assertions: list[dict[str, Any]] = [{"label": "c2pa.actions", "data": {"actions": [
        {"action": "c2pa.created",
         "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"}]}}]
    for label, entries in (NOT_ALLOWED if training is None else training).items():
        assertions.append({"label": label, "data": {"entries": entries}})
    manifest = {"claim_generator_info": [{"name": "test-artist-camera", "version": "1.0"}],
                "title": title, "assertions": assertions}
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain,
                                                       private, None))
    out = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, mime, io.BytesIO(image), out)
    return out.getvalue()


def tampered(signed: bytes) -> bytes:
    """One byte of the picture data changed after signing (near the end, past the manifest)."""
    at = len(signed) - 40
    return signed[:at] + bytes([signed[at] ^ 0x55]) + signed[at + 1:]


def jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A small deterministic JPEG."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()
