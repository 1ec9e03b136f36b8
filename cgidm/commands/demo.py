"""``cgidm demo``: the whole product in one command, through its real HTTP API.

Starts ``cgidm serve`` on a free loopback port with the demo pair, submits the ten Van Gogh
paintings the demo fine-tune was trained on as ``images`` and ten paintings it never saw as
``controls``, follows the job with a progress bar, prints the evidence and saves the
side-by-side pictures. Same code path as production: only the settings differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cgidm_core.names import IMAGE_SUFFIXES

DATASET = "wikiart-vangogh"
POLL_SECONDS = 0.5


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the service and authenticate the Van Gogh demo images (a few minutes, CPU)",
        description="Start the service locally, submit the demo images through HTTP, print "
        "per-image scores, p-values and verdicts, and save side-by-side pictures.",
    )
    parser.add_argument("--data", help=f"folder holding {DATASET}/membership and hold_out "
                        "(default: ../shared/data next to the project)")
    parser.add_argument("--out", default="cgidm-out/demo", help="output folder")
    parser.add_argument("--steps", type=int, help="PGD steps (default: the library's)")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after seconds")
    parser.add_argument("--keep-serving", action="store_true",
                        help="after the result, keep the service (and the job's web page) "
                        "running until Ctrl-C")
    parser.set_defaults(func=run)


def find_dataset(data: str | None) -> Path:
    """The demo images: --data, else ../shared/data beside the project or the working dir."""
    from cgidm_core.errors import ImageInputError

    candidates = []
    if data:
        candidates = [Path(data), Path(data) / DATASET]
    else:
        root = Path(__file__).resolve().parents[2]
        for base in (root.parent, Path.cwd().parent, Path.cwd()):
            candidates.append(base / "shared" / "data" / DATASET)
    for candidate in candidates:
        if (candidate / "membership").is_dir() and (candidate / "hold_out").is_dir():
            return candidate.resolve()
    raise ImageInputError(
        f"demo images not found (looked in {', '.join(map(str, candidates))}); pass "
        f"--data DIR where DIR/{DATASET}/membership and hold_out exist"
    )


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _follow(client: Any, job_id: str, timeout: float) -> dict[str, Any]:
    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    with tqdm(desc="authenticating", unit="step", dynamic_ncols=True) as bar:
        while True:
            job = client.get(f"/jobs/{job_id}").json()
            progress = job["progress"]
            if progress.get("steps_total") and bar.total != progress["steps_total"]:
                bar.total = progress["steps_total"]
                bar.refresh()
            bar.update(max(0, progress.get("steps_done", 0) - bar.n))
            bar.set_postfix_str(job["status"])
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                client.delete(f"/jobs/{job_id}")
                raise TimeoutError(f"the demo job did not finish within {timeout:.0f} s")
            time.sleep(POLL_SECONDS)


def _print_result(result: dict[str, Any]) -> None:
    """The evidence as ``cgidm check`` prints it: the score column is the one the p-values rest
    on (the evidence score with controls), the similarity beside it."""
    from .report import print_table

    print(f"\nMembership images (fine-tuned on) vs {len(result['controls'])} hold-out controls\n")
    test = result.get("controls_test")
    print_table(result["images"], test, result.get("evidence"), metric=result.get("metric"),
                controls=result["controls"], show_set_test=False)
    if test:
        print(f"\nSet-level test (one-sided Mann-Whitney U, images > controls): "
              f"U = {test['u_statistic']:.1f}, p = {test['p_value']:.4g}, "
              f"AUC = {test['auc']:.3f} (alpha = {test['alpha']})")
        if test.get("explanation"):
            print(test["explanation"])


def _download(client: Any, result: dict[str, Any], out: Path) -> None:
    for group in ("images", "controls"):
        folder = out / group
        folder.mkdir(parents=True, exist_ok=True)
        for row in result[group]:
            response = client.get(row["artifacts"]["side_by_side"])
            response.raise_for_status()
            (folder / f"{row['name']}.png").write_bytes(response.content)
    (out / "result.json").write_text(json.dumps(result, indent=2))


def run(args: argparse.Namespace) -> int:
    from cgidm.commands.serve import install_stop_signals

    install_stop_signals()  # Ctrl-C / SIGTERM stop the demo's service too, however it was started
    dataset = find_dataset(args.data)
    images, controls = _images(dataset / "membership"), _images(dataset / "hold_out")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cgidm-demo-"))
    # A private data folder and the built-in demo registry, whatever the caller's settings say.
    env = {"CGIDM_DATA_DIR": str(workdir), "CGIDM_STORAGE_URL": None, "CGIDM_BROKER_URL": None,
           "CGIDM_MODELS": None}
    started = time.monotonic()
    try:
        status = _run_demo(images, controls, dataset, out, env, args)
    except (RuntimeError, TimeoutError) as exc:  # a service process died or never got ready
        print(f"cgidm demo: error: {exc} (see {out / 'service.log'})", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:  # the service was stopped on the way out of EmbeddedService
        print("cgidm demo: interrupted; the service is stopped", file=sys.stderr)
        status = 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if status == 0:
        print(f"\nSide-by-side pictures (original | partial | recovered): {out}/images and "
              f"{out}/controls; full result: {out / 'result.json'}")
        print(f"cgidm demo: done in {time.monotonic() - started:.0f} s")
    return status


def _run_demo(images: list[Path], controls: list[Path], dataset: Path, out: Path,
              env: dict[str, str | None], args: argparse.Namespace) -> int:
    import httpx

    from cgidm.commands.serve import EmbeddedService

    log_path = out / "service.log"
    with log_path.open("wb") as log, EmbeddedService(port=_free_port(), env=env, log=log) as svc:
        print(f"cgidm demo: starting the service on {svc.url} (log: {log_path})", flush=True)
        svc.wait_ready()
        fields = {"pretrained": "demo-base", "finetuned": "demo-vangogh"}
        if args.steps:
            fields["steps"] = str(args.steps)
        files = [("images", (p.name, p.read_bytes())) for p in images]
        files += [("controls", (p.name, p.read_bytes())) for p in controls]
        with httpx.Client(base_url=svc.url, timeout=60) as client:
            response = client.post("/authenticate", data=fields, files=files)
            if response.status_code != 202:
                print(f"cgidm demo: submission refused: {response.text}", file=sys.stderr)
                return 1
            job_id = response.json()["job_id"]
            print(f"cgidm demo: job {job_id}: {len(images)} images from {dataset}/membership, "
                  f"{len(controls)} controls from hold_out", flush=True)
            print(f"cgidm demo: watch it in a browser: {svc.url}/checks/{job_id}", flush=True)
            job = _follow(client, job_id, args.timeout)
            if job["status"] != "succeeded":
                error = job.get("error") or {}
                print(f"cgidm demo: job {job['status']}: {error.get('code')}: "
                      f"{error.get('message')} (see {log_path})", file=sys.stderr)
                return 1
            _print_result(job["result"])
            _download(client, job["result"], out)
            if args.keep_serving:
                _serve_page(svc, job_id)
    return 0


def _serve_page(svc: Any, job_id: str) -> None:
    print(f"\ncgidm demo: the evidence page is {svc.url}/checks/{job_id} (new checks: "
          f"{svc.url}/); Ctrl-C stops the service", flush=True)
    try:
        while True:
            svc.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("cgidm demo: stopping the service", file=sys.stderr, flush=True)
