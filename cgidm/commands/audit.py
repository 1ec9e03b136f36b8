"""``cgidm audit``: one portfolio of images against many suspect models, ranked, with error control
across the models (cgidm_core.audit decides, cgidm_core.audit_run computes)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .common import expand_images

#: Exit status of an audit that finished but could not test every model (each failed one is
#: in audit.json with its error); 0 when every model was tested.
EXIT_PARTIAL = 5


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "audit",
        help="audit many suspect models against one set of images, with error control",
        description="Screen every model cheaply (loss + contrast), run the full CGI-DM verdict "
        "on the models the screen cannot clear, rank them and decide across all of them "
        "(Benjamini-Hochberg FDR by default, --family-wise for Holm/Bonferroni).",
    )
    parser.add_argument("--images", required=True, action="append",
                        help="the portfolio: image files or folders (repeatable)")
    parser.add_argument("--controls", required=True, action="append",
                        help="known non-members of the same kind (repeatable): every model's "
                        "p-value is measured against them")
    parser.add_argument("--models", required=True,
                        help='JSON file (or inline JSON) listing the suspects: [{"pretrained": '
                        'REF, "finetuned": REF, "prompt": optional}, ...]; references as for '
                        "`cgidm check` (paths, demo names, hub references)")
    parser.add_argument("--out", required=True, help="output folder (audit.json, pictures)")
    parser.add_argument("--fdr", "--level", dest="level", type=float, default=0.05,
                        help="error level across models (default 0.05): the false discovery "
                        "rate, or with --family-wise the family-wise error rate")
    parser.add_argument("--family-wise", nargs="?", const="holm", choices=["holm", "bonferroni"],
                        help="control the family-wise error rate instead (Holm by default)")
    parser.add_argument("--screen-clear-p", type=float, default=None,
                        help="a model whose screen p-value is above this is cleared without the "
                        "inversion (default: cgidm_core.audit.SCREEN_CLEAR_P); 1 runs the full "
                        "verdict on every model")
    group = parser.add_argument_group("method")
    group.add_argument("--steps", type=int, help="PGD steps of the full verdict")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--batch-size", type=int, help="images per batch")
    group.add_argument("--resolution", type=int, help="pixel side to run at")
    group.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    group.add_argument("--allow-network", action="store_true",
                       help="allow fetching models from a hub")
    parser.set_defaults(func=run)


def read_model_list(value: str) -> Any:
    """The ``--models`` value: inline JSON when it starts with ``[``, else a JSON file."""
    from cgidm_core.errors import ConfigError

    text = value if value.lstrip().startswith("[") else None
    if text is None:
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"--models {value}: no such file (give a JSON file or inline JSON)")
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--models is not valid JSON: {exc}") from None


def _stems(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        out.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return out


def make_loader(args: argparse.Namespace) -> Any:
    """``load(model)`` for the CLI: references resolve as for ``cgidm check`` (hub references
    are fetched into the cache and checked first)."""
    from cgidm_core.api import load_pair

    from .common import resolve_suspect

    def load(model: Any) -> Any:
        ns = argparse.Namespace(pretrained=model.pretrained, finetuned=model.finetuned,
                                prompt=model.prompt)
        resolve_suspect(ns)
        return load_pair(ns.pretrained, ns.finetuned, device=args.device, dtype=args.dtype,
                         allow_network=args.allow_network)

    return swapping(load, args)


def swapping(load: Any, args: argparse.Namespace) -> Any:
    """``load`` with LoRA files of a local base swapped in and out of that base, loaded once
    (cgidm_core.lora_swap); hub references and every other model go through ``load``."""
    from cgidm.model_refs import looks_like_reference
    from cgidm_core.demo import resolve_model_reference
    from cgidm_core.lora_swap import LoraSwapLoader

    def paths(model: Any) -> Any:
        if looks_like_reference(model.finetuned) or looks_like_reference(model.pretrained):
            return None
        return resolve_model_reference(model.pretrained), resolve_model_reference(model.finetuned)

    return LoraSwapLoader(load, paths, device=args.device, dtype=args.dtype,
                          allow_network=args.allow_network)


def _audit_settings(args: argparse.Namespace, level: float) -> Any:
    """The decision (level, correction, screen threshold) and the inversion's settings, checked
    before any model loads."""
    from dataclasses import replace

    from cgidm_core.audit import SCREEN_CLEAR_P
    from cgidm_core.audit_run import AuditSettings
    from cgidm_core.inversion import InversionConfig

    overrides = {k: v for k, v in (("steps", args.steps), ("resolution", args.resolution))
                 if v is not None}
    config = replace(InversionConfig(seed=args.seed), **overrides)
    config.validate()
    clear_p = SCREEN_CLEAR_P if args.screen_clear_p is None else args.screen_clear_p
    return AuditSettings(level=level, correction=args.family_wise or "bh", clear_p=clear_p,
                         inversion=config, batch_size=args.batch_size)


def _num(value: float | None) -> str:
    return f"{value:>9.3g}" if value is not None else f"{'-':>9}"


def _print_ranking(ranked: list[dict[str, Any]], counts: dict[str, int], correction: str,
                   level: float, wrote: str) -> None:
    print(f"{'rank':>4}  {'p':>9}  {'q':>9}  {'screen p':>9}  flagged  model")
    for m in ranked:
        if m.get("error"):
            print(f"{'-':>4}  {'FAILED, not tested:':>40}  {m['finetuned']}: "
                  f"{m['error']['message']}")
            continue
        print(f"{m['rank']:>4}  {_num(m['p_value'])}  {_num(m['q_value'])}  "
              f"{_num(m['screen_p_value'])}  {'yes' if m['flagged'] else 'no':>7}  "
              f"{m['finetuned']}")
    failed = f"; {counts['errors']} failed and were left out" if counts["errors"] else ""
    print(f"{counts['flagged']} of {counts['models'] - counts['errors']} tested model(s) "
          f"flagged at {'FDR' if correction == 'bh' else 'FWER'} {level:g}; "
          f"{counts['full_verdicts']} needed the full verdict{failed}; {wrote}")


def _signed(document: dict[str, Any]) -> dict[str, Any]:
    """The audit with its signature by the local key, as `cgidm check` signs results.json (the
    same key, made on first use). An audit that cannot be signed is still written, unsigned,
    with a warning."""
    from cgidm.audit_signing import SIGNER_CLI
    from cgidm.result_signing import SigningKeyError, load_or_create_key, sign_document

    try:
        signed = sign_document(document, load_or_create_key(), signer=SIGNER_CLI)
    except (SigningKeyError, ValueError) as exc:  # ValueError: a NaN cannot be canonicalised
        print(f"warning: audit.json is NOT signed: {exc}")
        return document
    print(f"signed with key {signed['signature']['key_id']} ({signed['signature']['digest']}); "
          "`cgidm verify-audit` checks it")
    return signed


def run(args: argparse.Namespace) -> int:
    from cgidm.result_signing import file_sha256
    from cgidm_core.audit import (
        check_level,
        decide_models,
        decision_settings,
        failed_entry,
        parse_models,
    )
    from cgidm_core.audit_run import run_audit
    from cgidm_core.images import load_image
    from cgidm_core.provenance import software

    level = check_level(args.level)
    models = parse_models(read_model_list(args.models))
    image_paths = expand_images(args.images)
    control_paths = expand_images(args.controls)
    # read every image before any model loads: a bad file fails in a second
    images = [load_image(p) for p in image_paths]
    controls = [load_image(p) for p in control_paths]
    image_names = [p.name for p in image_paths]
    control_names = [p.name for p in control_paths]
    settings = _audit_settings(args, level)
    config, correction, clear_p = settings.inversion, settings.correction, settings.clear_p
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = _stems(image_paths)
    pictures: dict[int, dict[str, dict[str, str]]] = {}
    hashes: dict[int, dict[str, dict[str, str]]] = {}

    def save(outcome: Any) -> None:
        entry = outcome.entry
        note = f" -> full verdict p={entry['p_value']:.3g}" if entry["tier"] == "full" else ""
        print(f"[{entry['index'] + 1}/{len(models)}] {entry['finetuned']}: screen "
              f"p={entry['screen_p_value']:.3g}{note} ({entry['seconds']:.1f} s)", flush=True)
        if not outcome.results:
            return
        folder = out_dir / "models" / f"{entry['index']:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        saved, digests = {}, {}
        for result, stem in zip(outcome.results, stems, strict=True):
            names = {"side_by_side": f"{stem}.side_by_side.png",
                     "recovered": f"{stem}.recovered.png"}
            result.side_by_side().save(folder / names["side_by_side"])
            result.recovered.save(folder / names["recovered"])
            saved[result.name] = {k: str((folder / v).relative_to(out_dir))
                                  for k, v in names.items()}
            digests[result.name] = {k: file_sha256(folder / v) for k, v in names.items()}
        pictures[entry["index"]] = saved
        hashes[entry["index"]] = digests

    def failed(index: int, exc: Exception) -> dict[str, Any]:
        """A model that cannot be loaded or run: recorded with its error, the others go on."""
        print(f"[{index + 1}/{len(models)}] {models[index].finetuned}: FAILED, not tested: "
              f"{exc}", flush=True)
        return failed_entry(index, models[index], exc)

    started = time.perf_counter()
    entries = run_audit(models, images, controls, image_names, control_names,
                        make_loader(args), settings, on_model=save, on_error=failed)
    ranked = decide_models(entries, level=level, correction=correction)
    for model in ranked:
        if model["flagged"] and model["index"] in pictures:
            model["pictures"] = pictures[model["index"]]
            # the pictures are evidence too: the signature covers their hashes
            model["picture_sha256"] = hashes[model["index"]]
    elapsed = time.perf_counter() - started
    document: dict[str, Any] = {
        "models": ranked,
        "decision": decision_settings(level, correction, clear_p),
        "counts": _counts(ranked),
        "images": image_names,
        "controls": control_names,
        "settings": {"inversion": config.to_dict(), "batch_size": args.batch_size},
        "software": software(),
        "seconds": round(elapsed, 2),
    }
    return _write(_signed(document), out_dir, correction, level, elapsed)


def _counts(ranked: list[dict[str, Any]]) -> dict[str, int]:
    from cgidm_core.audit import TIER_ERROR

    return {"models": len(ranked),
            "full_verdicts": sum(m["tier"] == "full" for m in ranked),
            "cleared_by_screen": sum(m["cleared_by_screen"] for m in ranked),
            "errors": sum(m["tier"] == TIER_ERROR for m in ranked),
            "flagged": sum(m["flagged"] for m in ranked)}


def _write(document: dict[str, Any], out_dir: Path, correction: str, level: float,
           elapsed: float) -> int:
    """Write audit.json, print the ranking; the exit status says whether every model was
    tested (0) or some failed (:data:`EXIT_PARTIAL`)."""
    (out_dir / "audit.json").write_text(json.dumps(document, indent=2))
    counts = document["counts"]
    _print_ranking(document["models"], counts, correction, level,
                   f"wrote {out_dir / 'audit.json'} in {elapsed:.1f} s")
    if counts["errors"]:
        print(f"cgidm: {counts['errors']} of {counts['models']} model(s) could not be tested "
              f"(see their error in audit.json); exit status {EXIT_PARTIAL}: partial",
              file=sys.stderr)
        return EXIT_PARTIAL
    return 0
