"""``cgidm verify-audit``: check an audit's signature offline (``cgidm verify``'s first step).

An audit document (audit.json of ``cgidm audit``, or of ``cgidm submit-audit``, which wraps the
service's signed result) is checked against the public keys given, in ``cgidm verify``'s order and
with its exit statuses: "NOT SIGNED BY THIS SERVICE" (exit 3: no signature, an unknown key or a
forged one), "EDITED AFTER SIGNING" (exit 4: a genuine signature over content that has since
changed, or an evidence picture beside audit.json whose sha256 differs from the signed one),
else 0. It does not re-run the models: an audit is many checks, and re-running each suspect is
``cgidm check`` / ``cgidm verify`` on that pair (docs/AUDITS.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cgidm.result_signing import WELL_KNOWN_PATH


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "verify-audit",
        help="check an audit's signature (and its pictures' hashes) offline",
        description="Check that audit.json carries a genuine signature by one of the given "
        "public keys over its present content, and that the evidence pictures beside it have "
        "their signed sha256. Exit 3: not signed by this service; 4: edited after signing. "
        "The models are not re-run.",
    )
    parser.add_argument("audit", help="audit output folder or its audit.json (cgidm audit, "
                        "cgidm submit-audit)")
    parser.add_argument("--public-key", action="append", metavar="FILE",
                        help="public key(s) to check with: the service's "
                        f"{WELL_KNOWN_PATH} saved to a file, `cgidm keys public` output or a "
                        "PEM public key; repeatable (default: the local key of `cgidm keys`)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cgidm.audit_signing import AuditFileError, load_local_audit, picture_problems
    from cgidm.commands.verify import _public_keys, signature_verdict
    from cgidm.result_signing import check_signature
    from cgidm_core.errors import ConfigError

    try:
        local = load_local_audit(Path(args.audit))
    except AuditFileError as exc:
        raise ConfigError(str(exc)) from exc
    keys = _public_keys(args.public_key, local.document)
    if keys is None:
        raise ConfigError("no public key for this audit's signature is at hand: pass "
                          f"--public-key with the service's {WELL_KNOWN_PATH} (or `cgidm keys "
                          "public` output of the machine that ran the audit)")
    status, line = signature_verdict(check_signature(local.document, keys),
                                     picture_problems(local))
    print(line.replace("cgidm verify:", "cgidm verify-audit:", 1))
    return status
