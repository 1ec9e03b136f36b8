"""``cgidm keys``: make API keys for the service, and the Ed25519 key that signs results.

The service stores only SHA-256 hashes of keys (``CGIDM_API_KEYS=name:<hex>,...``), so the key
itself is shown once, here, to be handed to its user; losing it means making a new one.

``cgidm keys signing`` makes (on first use) or rotates the signing key (cgidm/result_signing.py):
``cgidm check`` signs with it, and so does a service given it as CGIDM_SIGNING_KEY. ``cgidm keys
public`` prints the public key set that ``cgidm verify --public-key`` checks results with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
import sys
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
KEY_BYTES = 32  # 256 bits of randomness, 43 URL-safe characters


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "keys",
        help="make API keys for the HTTP service",
        description="Print a fresh API key and the CGIDM_API_KEYS entry that enables it.",
    )
    actions = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = actions.add_parser("new", help="make a key for NAME (a person, team or client app)")
    new.add_argument("name", help="key name; job records show it as their owner")
    new.set_defaults(func=run_new)
    hashed = actions.add_parser("hash", help="print the entry for an existing key read from "
                                "standard input")
    hashed.add_argument("name")
    hashed.set_defaults(func=run_hash)
    signing = actions.add_parser("signing", help="make (first use) or --rotate the Ed25519 key "
                                 "that signs results; prints its path and key id")
    signing.add_argument("--key", help="key file (default: $CGIDM_SIGNING_KEY, else "
                         "~/.config/cgidm/signing-key.pem)")
    signing.add_argument("--rotate", action="store_true", help="replace it with a new key; the "
                         "old public key stays published beside it (<key>.retired/)")
    signing.set_defaults(func=run_signing)
    public = actions.add_parser("public", help="print the public key set (JSON) that verifies "
                                "results signed with the signing key")
    public.add_argument("--key", help="key file (default as for `cgidm keys signing`)")
    public.add_argument("--pem", action="store_true", help="print the current public key as "
                        "PEM instead")
    public.set_defaults(func=run_public)


def _check_name(name: str) -> None:
    from cgidm_core.errors import ConfigError

    if not _NAME.match(name):
        raise ConfigError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")


def entry(name: str, key: str) -> str:
    return f"{name}:{hashlib.sha256(key.encode()).hexdigest()}"


def run_new(args: argparse.Namespace) -> int:
    _check_name(args.name)
    key = secrets.token_urlsafe(KEY_BYTES)
    print(f"API key for {args.name} (shown only this once; the service keeps only its hash):")
    print(f"  {key}")
    print("Add this entry to CGIDM_API_KEYS (entries are separated by commas) and restart the "
          "gateway:")
    print(f"  {entry(args.name, key)}")
    print(f"Clients send it as: Authorization: Bearer {key}")
    return 0


def run_hash(args: argparse.Namespace) -> int:
    from cgidm_core.errors import ConfigError

    _check_name(args.name)
    key = sys.stdin.readline().strip()
    if not key:
        raise ConfigError("no key on standard input; pipe the key in, e.g. "
                          "`printf %s \"$KEY\" | cgidm keys hash NAME`")
    print(entry(args.name, key))
    return 0


def run_signing(args: argparse.Namespace) -> int:
    from cgidm.result_signing import load_or_create_key, rotate_key

    path = Path(args.key) if args.key else None
    if args.rotate:
        key, retired = rotate_key(path)
        if retired:
            print(f"retired key {retired}: its public key stays published "
                  f"({key.path.name}.retired/{retired}.pub.pem)")
    else:
        key = load_or_create_key(path)
    print(f"signing key {key.key_id}: {key.path}")
    print("Keep this file private. `cgidm keys public` prints the public key set to hand to "
          "whoever verifies results.")
    return 0


def run_public(args: argparse.Namespace) -> int:
    from cgidm.result_signing import key_set, load_or_create_key, public_pem

    key = load_or_create_key(Path(args.key) if args.key else None)
    if args.pem:
        print(public_pem(key.public).decode("ascii"), end="")
    else:
        print(json.dumps(key_set(key), indent=2))
    return 0
