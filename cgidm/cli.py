"""The ``cgidm`` console script.

Each subcommand lives in ``cgidm.commands.<name>`` and exposes ``register(subparsers)``. Heavy
imports (torch, diffusers) happen inside the command functions, so ``cgidm --help`` is instant.
Errors the user can fix are printed as one line and exit non-zero; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: HF_HUB_OFFLINE as the user set it (None: unset), before main() defaults it to 1: a hub
#: reference (`--finetuned hf:...`) is fetched online unless the user asked for offline.
USER_HF_HUB_OFFLINE: str | None = os.environ.get("HF_HUB_OFFLINE")

COMMANDS = ("check", "verify", "report", "submit", "eval", "models", "serve", "demo", "keys",
            "audit", "submit-audit", "verify-audit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgidm",
        description="Was this fine-tuned diffusion model trained on my images? (CGI-DM)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"cgidm.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Models load from local files only unless the user explicitly allows the network.
    global USER_HF_HUB_OFFLINE
    USER_HF_HUB_OFFLINE = os.environ.get("HF_HUB_OFFLINE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("cgidm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one clear line, no traceback
        from cgidm.client import ServiceError

        if isinstance(exc, ServiceError):  # before cgidm_core: `submit` runs without torch
            print(f"cgidm: error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            # The gateway image installs the torch-free commands' packages only (keys, models,
            # submit); the commands that run the method need torch and diffusers.
            print(f"cgidm: error: `cgidm {args.command}` needs the Python package "
                  f"{exc.name.split('.')[0]!r}, which this installation lacks (the gateway "
                  "image has no torch); run it where cgidm is installed with its dependencies",
                  file=sys.stderr)
            return 1
        from cgidm.model_fetch import ModelFetchError
        from cgidm.model_files import ModelFileError
        from cgidm.model_refs import ModelReferenceError
        from cgidm.registry import UnknownModel

        if isinstance(exc, ModelFetchError | ModelFileError | ModelReferenceError | UnknownModel):
            print(f"cgidm: error: {exc}", file=sys.stderr)
            return 2
        from cgidm_core.errors import CGIDMError

        if isinstance(exc, CGIDMError):
            print(f"cgidm: error: {exc}", file=sys.stderr)
            return 2
        if os.environ.get("CGIDM_DEBUG"):
            raise
        print(f"cgidm: unexpected error: {type(exc).__name__}: {exc} "
              "(set CGIDM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
