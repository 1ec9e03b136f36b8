"""``cgidm submit``: check images against a suspect model through a cgidm service.

The client side of the service for people who hold a suspect model file: it uploads the model
(when ``--finetuned`` is a file), submits the images (and controls), shows a progress bar while
the job runs, downloads ``result.json`` and every picture into ``--out`` and prints the same
table as ``cgidm check``. It needs no torch (``cgidm.client`` uses httpx only), so it runs on
any laptop. Any failure (401, 404, 413, a failed job...) is one line and a non-zero exit; a full
queue (429) is retried after the service's ``Retry-After``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cgidm.model_files import UPLOAD_KINDS

from .common import add_method_arguments, expand_images
from .report import print_table


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "submit",
        help="check images through a cgidm service (uploads the suspect model if it is a file)",
        description="Upload the suspect model (when --finetuned is a .safetensors file), submit "
        "the images to the service, wait for the result, download result.json and the pictures "
        "and print the evidence table.",
    )
    parser.add_argument("--server", required=True, help="service URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--key", help="API key (default: $CGIDM_API_KEY)")
    parser.add_argument("--pretrained", required=True, help="registry id of the base model")
    parser.add_argument("--finetuned", required=True,
                        help="the suspect model: a .safetensors file (uploaded first), a "
                        "model id (registry, or one of your uploads), or a hub reference the "
                        "service fetches where its operator allows it (hf:OWNER/NAME[@REV][:FILE], "
                        "civitai:VERSION_ID, a huggingface.co or civitai.com model page URL)")
    parser.add_argument("--kind", choices=UPLOAD_KINDS,
                        help="what an uploaded file holds (detected when omitted)")
    parser.add_argument("--controls", help="folder of known non-members (p-values, set test)")
    add_method_arguments(parser)
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from cgidm.client import ServiceError

    if args.feature_model:
        raise ServiceError("--feature-model is the service's own (CGIDM_FEATURE_MODEL); pass "
                           "--metric clip or dino if the service has one")
    return {"preset": None if args.preset == "default" else args.preset,
            "prompt": args.prompt, "steps": args.steps, "seed": args.seed,
            "batch_size": args.batch_size, "mc_samples": args.mc_samples, "metric": args.metric,
            "gradient_checkpointing": args.gradient_checkpointing}


class _Progress:
    """A tqdm bar over the job's PGD steps, fed by each poll."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc="cgidm submit", unit="step", dynamic_ncols=True)

    def __call__(self, job: dict[str, Any]) -> None:
        progress = job.get("progress") or {}
        total = progress.get("steps_total")
        if total and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        self.bar.update(max(0, (progress.get("steps_done") or 0) - self.bar.n))
        self.bar.set_postfix_str(job["status"])

    def close(self) -> None:
        self.bar.close()


def run(args: argparse.Namespace) -> int:
    from cgidm.client import CgidmClient, ServiceError

    images = expand_images(args.images, error=ServiceError)
    controls = expand_images([args.controls], error=ServiceError) if args.controls else []
    settings = _settings(args)
    out = Path(args.out)
    key = args.key or os.environ.get("CGIDM_API_KEY")
    with CgidmClient(args.server, key) as service:
        finetuned = args.finetuned
        if Path(finetuned).is_file():
            model = service.upload_model(finetuned, args.pretrained, kind=args.kind,
                                         prompt=args.prompt)
            print(f"uploaded {finetuned} as {model['id']} ({model['kind']}, "
                  f"{model['size_bytes']} bytes, sha256 {model['sha256']})", file=sys.stderr)
            finetuned = model["id"]
        accepted = service.submit(args.pretrained, finetuned, images, controls, **settings)
        for warning in accepted.get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
        progress = _Progress()
        try:
            job = service.wait(accepted["job_id"], poll=0.5, timeout=args.timeout,
                               progress=progress)
        finally:
            progress.close()
        result = job["result"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        count = 0
        for name, kind, data in service.artifacts(result):
            (out / f"{name}.{kind}.png").write_bytes(data)
            count += 1
    print_table(result["images"], result.get("controls_test"), result.get("evidence"),
                metric=result.get("metric"))
    print(f"wrote {out / 'result.json'} and {count} pictures (job {job['job_id']})")
    return 0
