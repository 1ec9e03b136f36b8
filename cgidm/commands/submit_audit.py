"""``cgidm submit-audit``: an audit (one portfolio against many models) through a cgidm service.

Torch-free like ``cgidm submit``: it sends the images, controls and model list, follows the
audit model by model, writes the service's ranked result to ``OUT/audit.json`` with the evidence
pictures of the flagged models, and prints the ranked table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import expand_images


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "submit-audit",
        help="audit many suspect models through a cgidm service",
        description="Submit an audit (the images, known non-member controls and a JSON list of "
        "suspect models), wait for it and download the ranked result.",
    )
    parser.add_argument("--server", required=True, help="service URL")
    parser.add_argument("--key", help="API key (default: $CGIDM_API_KEY)")
    parser.add_argument("--images", required=True, action="append", help="image files/folders")
    parser.add_argument("--controls", required=True, action="append",
                        help="known non-members: files/folders")
    parser.add_argument("--models", required=True,
                        help='JSON file (or inline JSON): [{"pretrained": ID, "finetuned": ID, '
                        '"prompt": optional}, ...] with registry ids, your uploads\' ids or hub '
                        "references")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--fdr", "--level", dest="level", type=float, default=0.05)
    parser.add_argument("--family-wise", nargs="?", const="holm", choices=["holm", "bonferroni"])
    parser.add_argument("--screen-clear-p", type=float,
                        help="clear a model without the inversion when its screen p-value is "
                        "above this (default: the service's, 0.2); 1 runs every full verdict")
    parser.add_argument("--steps", type=int, help="PGD steps of the full verdict")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cgidm.client import CgidmClient, ServiceError

    value = args.models
    if value.lstrip().startswith("["):
        text = value
    elif Path(value).is_file():
        text = Path(value).read_text()
    else:
        raise ServiceError(f"--models {value}: no such file (give a JSON file or inline JSON)")
    try:
        models = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServiceError(f"--models is not valid JSON: {exc}") from None
    images = expand_images(args.images, error=ServiceError)
    controls = expand_images(args.controls, error=ServiceError)
    out = Path(args.out)
    key = args.key or os.environ.get("CGIDM_API_KEY")
    seen: dict[int, str] = {}

    def progress(audit: dict) -> None:
        for row in audit["progress"]["models"]:
            if row["state"] == "done" and seen.get(row["index"]) != "done":
                seen[row["index"]] = "done"
                p = "-" if row.get("p_value") is None else f"{row['p_value']:.3g}"
                print(f"[{audit['progress']['models_done']}/{audit['progress']['models_total']}]"
                      f" {row['finetuned']}: {row['tier']}, p={p}", flush=True)

    with CgidmClient(args.server, key) as client:
        accepted = client.submit_audit(models, images, controls, fdr=args.level,
                                       family_wise=args.family_wise, steps=args.steps,
                                       seed=args.seed, screen_clear_p=args.screen_clear_p)
        print(f"audit {accepted['audit_id']}: {accepted['models']} models", flush=True)
        audit = client.wait_audit(accepted["audit_id"], timeout=args.timeout, progress=progress)
        result = audit["result"]
        out.mkdir(parents=True, exist_ok=True)
        for model in result["models"]:
            for name, urls in (model.get("pictures") or {}).items():
                folder = out / "models" / f"{model['index']:03d}"
                folder.mkdir(parents=True, exist_ok=True)
                for kind, url in urls.items():
                    (folder / f"{name}.{kind}.png").write_bytes(
                        client._request("GET", url).content)
    (out / "audit.json").write_text(json.dumps(audit, indent=2))
    print(f"{'rank':>4}  {'p':>9}  {'q':>9}  flagged  model")
    for m in result["models"]:
        if m.get("error"):
            print(f"{'-':>4}  FAILED, not tested: {m['finetuned']}: {m['error']['message']}")
            continue
        print(f"{m['rank']:>4}  {m['p_value']:>9.3g}  {m['q_value']:>9.3g}  "
              f"{'yes' if m['flagged'] else 'no':>7}  {m['finetuned']}")
    errors = result["counts"].get("errors", 0)
    print(f"{result['counts']['flagged']} of {result['counts']['models'] - errors} tested "
          f"flagged; wrote {out / 'audit.json'}", file=sys.stdout)
    if errors:
        from .audit import EXIT_PARTIAL

        print(f"cgidm: {errors} model(s) could not be tested (see their error in audit.json); "
              f"exit status {EXIT_PARTIAL}: partial", file=sys.stderr)
        return EXIT_PARTIAL
    return 0
