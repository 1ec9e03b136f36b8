"""``cgidm check``: authenticate local images against a model pair and write the evidence."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cgidm.result_signing import file_sha256
from cgidm_core.names import (
    CHECK_EVIDENCE_MODES,
    DEFAULT_DISPLAY,
    DEFAULT_EVIDENCE,
    DEFAULT_METRIC,
    DISPLAY_MODES,
)

from .common import (
    add_method_arguments,
    add_model_arguments,
    expand_images,
    inversion_config,
    load_pair_from_args,
    progress_bar,
)
from .report import print_table


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "check",
        help="authenticate images against a pretrained/fine-tuned pair",
        description="Recover half of each image by contrasting gradient inversion and score "
        "how close the recovery is to the original (higher = more likely in the fine-tuning set).",
    )
    add_model_arguments(parser)
    add_method_arguments(parser)
    parser.add_argument(
        "--controls",
        help="folder of known non-members (works never released, or made after the model): "
        "gives each image a p-value and the set a Mann-Whitney U test",
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level")
    parser.add_argument(
        "--evidence",
        choices=CHECK_EVIDENCE_MODES,
        default=DEFAULT_EVIDENCE,
        help="the score verdicts rest on (with --controls): 'paired' (default, chosen on the "
        "benchmark suite among the scores that pass its null controls) = z(contrast64: the "
        "contrast with 64 draws shared by every image) + z(progress: how far the inversion "
        "moved towards the original), standardised over images and controls together; "
        "'objective+contrast' = the default until 2026-12-08, z(minus CGI-DM's objective over "
        "the inversion's second half) + z(contrast); 'fused' = an older default, z(SSIM) + "
        "z(PSNR) + z(loss attack) + z(contrast), which also scores how easy an image is to "
        "fill in (false positives when images and controls differ that way); 'contrast' = "
        "the contrast alone; 'similarity' = --metric alone",
    )
    parser.add_argument(
        "--display",
        choices=DISPLAY_MODES,
        default=DEFAULT_DISPLAY,
        help="the recovered picture written: 'palette_clamp' (default) cuts off-palette colours "
        "back into each channel's range in the image's kept half; 'raw' writes the recovery as "
        "scored. Scores and verdicts always use the raw recovery",
    )
    parser.add_argument(
        "--base-recovery",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also recover each image with the base model alone (the same PGD on its own "
        "denoising loss) and write it as <name>.base_recovered.png, shown beside the suspect's "
        "recovery in the report (default: on; costs about half the check's time again; no "
        "score changes)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.set_defaults(func=run)


def _stem_names(paths: list[Path]) -> list[str]:
    """Unique file stems for the outputs, even when two inputs share a name."""
    seen: dict[str, int] = {}
    out = []
    for path in paths:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def _with_hub_source(provenance: dict, source: dict | None, civitai: dict | None) -> dict:
    """The provenance, with where a suspect named by a hub reference came from: the reference as
    given, the pinned revision or version, file name, size, sha256 and the time it was fetched
    (``cgidm verify`` fetches it again from this); for a local file, the Civitai version its
    hash belongs to when that was looked up (CGIDM_CIVITAI_HASH_LOOKUP)."""
    extra = {k: v for k, v in (("hub", source), ("civitai", civitai)) if v is not None}
    if not extra:
        return provenance
    models = dict(provenance.get("models") or {})
    models["finetuned"] = {**(models.get("finetuned") or {}), **extra}
    return {**provenance, "models": models}


def run(args: argparse.Namespace) -> int:
    """``cgidm check``: read the images, run the method, write pictures and the signed
    results.json, print the table."""
    from cgidm_core.api import authenticate
    from cgidm_core.images import load_image

    # 1. Read every image before loading models: a bad file should fail in a second, not a minute.
    image_paths = expand_images(args.images)
    control_paths = expand_images([args.controls]) if args.controls else []
    everything = image_paths + control_paths
    for path in everything:
        load_image(path)
    config = replace(inversion_config(args), base_recovery=args.base_recovery)
    out_dir = Path(args.out)
    # 2. Load the pair and choose the prompt (saying where it came from).
    pair = load_pair_from_args(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt = _announced_prompt(args, pair)
    # 3. Run the method on the images and the controls together.
    started = time.perf_counter()
    with progress_bar("cgidm check") as update:
        results = authenticate(
            pair,
            everything,  # the files themselves: provenance hashes them as received
            names=[p.name for p in everything],
            prompt=prompt.text,
            config=config,
            score_metric=args.metric,
            feature_model=args.feature_model,
            batch_size=args.batch_size,
            progress=update,
            display=args.display,
        )
    elapsed = time.perf_counter() - started
    suspects, controls = results[: len(image_paths)], results[len(image_paths) :]
    # 4. Write each suspect's pictures; build the evidence (p-values, verdicts, set test).
    records = _write_pictures(suspects, image_paths, out_dir)
    document, evidence = _evidence_document(args, records, controls, control_paths,
                                            image_paths, prompt, config, pair, results, elapsed)
    # 5. Sign and write results.json, then tell the user what was found and written.
    signed = _signed(document)
    (out_dir / "results.json").write_text(json.dumps(signed, indent=2))
    print_table(evidence["images"], document.get("set_test"), evidence["evidence"],
                metric=args.metric or DEFAULT_METRIC, controls=evidence["controls"])
    for result in results:
        skipped = result.extra.get("nonfinite_gradient_steps", 0)
        if skipped:
            print(f"note: {result.name}: {skipped} of {config.steps} PGD steps skipped because "
                  "the gradient was not finite (float16 overflow?); --dtype float32 avoids it")
    pictures = sum(len(r.get("picture_sha256") or {}) for r in records)
    print(f"wrote {out_dir / 'results.json'} and {pictures} pictures in {elapsed:.1f} s")
    if "signature" in signed:
        print(f"signed with key {signed['signature']['key_id']} ({signed['signature']['digest']}); "
              "`cgidm keys public` prints the public key that verifies it")
    return 0


def _announced_prompt(args: argparse.Namespace, pair: Any) -> Any:
    """The prompt (``cgidm_core.prompts.choose_prompt``), printed with where it came from, or
    the warning when there is none."""
    from cgidm_core.prompts import choose_prompt

    prompt = choose_prompt(args.prompt, pair)
    if prompt.warning:
        print(f"warning: {prompt.warning}")
    elif prompt.source not in ("given", "unconditional"):
        print(f"prompt: {prompt.text!r} (from the {prompt.source.replace('_', ' ')}: "
              f"{prompt.origin})")
    return prompt


def _write_pictures(suspects: Sequence[Any], image_paths: list[Path],
                    out_dir: Path) -> list[dict[str, Any]]:
    """Save each suspect's four pictures; returns its record with their names and hashes."""
    records = []
    for result, stem in zip(suspects, _stem_names(image_paths), strict=True):
        recovered, side = f"{stem}.recovered.png", f"{stem}.side_by_side.png"
        # the original as the method saw it (resized, centre-cropped) and the half it kept:
        # the report shows them beside the recovery
        partial, original = f"{stem}.partial.png", f"{stem}.original.png"
        result.recovered.save(out_dir / recovered)
        result.side_by_side().save(out_dir / side)
        result.partial.save(out_dir / partial)
        result.original.save(out_dir / original)
        names = {"recovered": recovered, "partial": partial, "side_by_side": side,
                 "original": original}
        if result.base_recovered is not None:  # the base model's own recovery, for the report
            names["base_recovered"] = f"{stem}.base_recovered.png"
            result.base_recovered.save(out_dir / names["base_recovered"])
        records.append({**result.to_dict(), **names,
                        # the pictures are evidence too: the signature covers their hashes
                        "picture_sha256": {kind: file_sha256(out_dir / name)
                                           for kind, name in names.items()}})
    return records


def _evidence_document(args: argparse.Namespace, records: list[dict[str, Any]],
                       controls: Sequence[Any], control_paths: list[Path],
                       image_paths: list[Path], prompt: Any, config: Any, pair: Any,
                       results: Any, elapsed: float) -> tuple[dict[str, object], dict[str, Any]]:
    """results.json before signing, and the evidence it was built from: every image's C2PA
    Content Credentials (read from the file as given), the p-values and verdicts against the
    controls, the settings and the provenance."""
    from cgidm.content_credentials import read as read_credentials
    from cgidm_core.evidence import build_evidence

    for record, path in zip(records, image_paths, strict=True):
        record["content_credentials"] = read_credentials(path.read_bytes())
    control_records = [{**r.to_dict(), "content_credentials": read_credentials(p.read_bytes())}
                       for r, p in zip(controls, control_paths, strict=True)]
    evidence = build_evidence(
        records,
        control_records,
        alpha=args.alpha,
        evidence=args.evidence,
        settings={
            "pretrained": str(args.pretrained),
            "finetuned": str(getattr(args, "finetuned_reference", None) or args.finetuned),
            **prompt.to_settings(),
            "metric": args.metric or DEFAULT_METRIC,
            "batch_size": args.batch_size,
            "inversion": config.to_dict(),
            "pair": pair.describe(),
        },
    )
    document: dict[str, object] = {
        "images": evidence["images"],
        "settings": evidence["settings"],
        "evidence": evidence["evidence"],
        "seconds": round(elapsed, 2),
        # what the evidence was computed from: hashes of every image and model file, settings,
        # versions, device and dtype (`cgidm verify` re-runs it from this)
        "provenance": _with_hub_source(results.provenance,
                                       getattr(args, "suspect_source", None),
                                       getattr(args, "suspect_civitai", None)),
    }
    if controls:
        document["controls"] = evidence["controls"]
        document["set_test"] = evidence["set_test"]
    return document, evidence


def _signed(document: dict[str, object]) -> dict[str, Any]:
    """The document with its signature by the local key (made on first use). A result that
    cannot be signed (an unwritable key folder) is still written, unsigned, with a warning."""
    from cgidm.result_signing import SigningKeyError, load_or_create_key, sign_document

    try:
        return sign_document(document, load_or_create_key(), signer="cgidm check")
    except (SigningKeyError, ValueError) as exc:
        print(f"warning: results.json is NOT signed: {exc}")
        return document

