"""``cgidm keys``: make API keys for the service and the entries that configure them.

The service stores only SHA-256 hashes of keys (``CGIDM_API_KEYS=name:<hex>,...``), so the key
itself is shown once, here, to be handed to its user; losing it means making a new one.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import sys

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
