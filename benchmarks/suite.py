"""The accuracy benchmark suite: many pixel pairs, every verdict score, worst case and mean.

    .venv/bin/python -m benchmarks.suite                 # train what is missing, evaluate what is
                                                         # missing, write docs/ACCURACY.md
    .venv/bin/python -m benchmarks.suite --list          # the pairs and where they are cached
    .venv/bin/python -m benchmarks.suite --train-only    # just make the fine-tunes
    .venv/bin/python -m benchmarks.suite --datasets vangogh-a --strengths strong --seeds 0

Pairs (``cgidm_core/suite_pairs.py``): ``demo-base`` fully fine-tuned with one recipe the defaults
were not tuned on (lr 2e-4 constant, random flips, batch 10) on

- Van Gogh split A (the authors' 10 members / 10 hold-out) and split B (swapped);
- DreamBooth photos: 2 photos each of 5 subjects; hard hold-out = 2 other photos of each of
  those subjects (10), easy hold-out = 2 photos each of 5 other subjects (10);

at three strengths (200 / 500 / 1000 steps, checkpoints of one run) and two seeds; and peft
LoRAs of ``demo-base`` on Van Gogh split A (``cgidm_core/pixel_lora_pairs.py``: attention only
or attention + convolutions, ranks 4-64, merged into the base for evaluation; ``--lora``).
The latent family's pairs are read from ``benchmarks.latent_suite``'s cache (``--no-latent`` to
leave them out; that command makes them). The headline is the leave-one-recipe-group-out table
per family and for both families together (``cgidm_core.held_out``, bootstrap intervals), among
the candidates that pass the null controls (``benchmarks.null_controls``: every candidate scored
on pairs whose fine-tune is the base itself; their values and the images' null values are
cached apart, under ``<cache>/null``), and the report names every pair the suite defines that
is missing from the cache. ``--out`` is written only between its
``<!-- BEGIN/END generated ... -->`` markers: hand-written text around them is kept. Fine-tunes
and per-pair results are cached under ``--cache`` (default ``~/.cache/cgidm/suite``), keyed by
a hash of recipe, data and evaluation settings: a rerun computes only what is missing.

Every pair is scored by every candidate verdict score (CGI-DM's similarity metrics at several
PGD step counts, the CGI-DM objective's own values, the contrast loss, the loss attack, PIA,
SecMI and fusions); the table gives per pair AUC with a bootstrap 95 % interval and TPR at the
lowest FPR the pair's hold-out supports (1 / number of non-members), then the worst case and the
mean over pairs. Scores are ranked worst case first, then mean, then cost.

    .venv/bin/python -m benchmarks.suite --no-train --wait &   # extra evaluating processes
    .venv/bin/python -m benchmarks.suite --report-only         # the report from cached values

Several processes can evaluate at once (``--wait``; each takes a fine-tune under a lock file in
the cache, ``<cache>/results/*.lock``: delete a lock left by a killed process). The report
also writes the README's table (``--table-out``) and the members-vs-controls picture grid of
``--grid-pair`` (``--grid``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.pair_evaluation import evaluate_pair, null_slice, pair_slice  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from cgidm_core.suite_pairs import SEEDS, STRENGTHS, default_cache

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="fine-tunes and per-pair results (default ~/.cache/cgidm/suite)")
    parser.add_argument("--data", type=Path, default=None, help="default: ../shared/data")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="vangogh-a vangogh-b dreambooth (default: all)")
    parser.add_argument("--strengths", nargs="+", default=None, choices=list(STRENGTHS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help=f"default: {' '.join(map(str, SEEDS))}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--lora", nargs="*", default=None, metavar="RECIPE:SEED",
                        help="pixel LoRA runs (cgidm_core/pixel_lora_pairs.py), e.g. "
                        "lora-attn-r16:0; default: its DEFAULT_SET; give --lora alone for none")
    parser.add_argument("--lora-only", action="store_true",
                        help="of the pixel pairs, only the LoRA ones (e.g. for a --wait worker)")
    parser.add_argument("--no-latent", action="store_true",
                        help="leave the latent family (benchmarks.latent_suite's cache) out")
    parser.add_argument("--latent-pgd-steps", type=int, default=100,
                        help="the latent pairs' values evaluated at this many PGD steps")
    parser.add_argument("--list", action="store_true", help="list the pairs and exit")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--no-train", action="store_true",
                        help="evaluate only pairs whose fine-tune is already cached")
    parser.add_argument("--display-variant", action="store_true",
                        help="also run the palette-bounded inversion on the selected pairs "
                        "(cached; the full run makes it on --grid-pair only), then report")
    parser.add_argument("--report-only", action="store_true",
                        help="train and evaluate nothing: report the pairs already evaluated")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "ACCURACY.md",
                        help="the full report (markdown)")
    parser.add_argument("--table-out", type=Path, default=REPO_ROOT / "docs" / "accuracy_table.md",
                        help="the README's accuracy table (markdown snippet; '' to skip)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number as JSON")
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.add_argument("--grid", type=Path, default=REPO_ROOT / "docs" / "images" /
                        "suite_grid_vangogh_strong.png",
                        help="members-vs-controls picture grid of --grid-pair ('' to skip)")
    parser.add_argument("--grid-pair", default="vangogh-a/strong/s0/holdout")
    parser.add_argument(
        "--wait", action="store_true",
        help="evaluate fine-tunes as another process finishes them (polls until all exist); "
        "several evaluating processes share the work through lock files in the cache",
    )
    return parser.parse_args(argv)


def selected_pairs(args: argparse.Namespace):
    """The pixel family's pairs: the full fine-tunes, then the LoRA pairs."""
    from cgidm_core.pixel_lora_pairs import pixel_lora_pairs
    from cgidm_core.suite_pairs import suite_pairs

    full = [] if getattr(args, "lora_only", False) else suite_pairs(
        args.data,
        datasets=tuple(args.datasets) if args.datasets else None,
        strengths=tuple(args.strengths) if args.strengths else None,
        seeds=tuple(args.seeds) if args.seeds else None,
    )
    return [*full, *pixel_lora_pairs(args.data, runs=lora_runs(args))]


def lora_runs(args: argparse.Namespace) -> tuple[tuple[str, int], ...] | None:
    """``--lora recipe:seed ...`` as (recipe, seed) pairs; None = the default set."""
    from cgidm_core.errors import ConfigError

    if getattr(args, "lora", None) is None:
        return None
    runs = []
    for item in args.lora:
        name, _, seed = item.partition(":")
        if not seed.isdigit():
            raise ConfigError(f"--lora {item!r}: give RECIPE:SEED, e.g. lora-attn-r16:0")
        runs.append((name, int(seed)))
    return tuple(runs)


def is_lora(pair) -> bool:
    from cgidm_core.pixel_lora_pairs import PixelLoraPair

    return isinstance(pair, PixelLoraPair)


def train_missing(args: argparse.Namespace, pairs) -> dict[str, float]:
    """Make every missing fine-tune; returns seconds per training run made now."""
    from cgidm_core import pixel_lora_pairs
    from cgidm_core.suite_pairs import STRENGTHS, train_run

    runs: dict[tuple[str, int], object] = {}
    made: dict[str, float] = {}
    for pair in pairs:
        if is_lora(pair):
            if not (pair.model_dir(args.cache) / "training.json").is_file():
                log(f"training the LoRA of {pair.pair_id}")
                started = time.perf_counter()
                pixel_lora_pairs.train_run(pair, args.cache, log=log)
                made[pair.pair_id] = time.perf_counter() - started
            continue
        runs.setdefault((pair.split.name, pair.seed), pair)
    for (split_name, seed), pair in runs.items():
        out_root = pair.model_dir(args.cache).parent  # type: ignore[attr-defined]
        # One run saves every strength up to the largest one asked for.
        top = max(STRENGTHS[s] for s in (args.strengths or STRENGTHS))
        wanted = {s: n for s, n in STRENGTHS.items() if n <= top}
        if all((out_root / s / "training.json").is_file() for s in wanted):
            continue
        log(f"fine-tuning {split_name} seed {seed} -> {out_root}")
        started = time.perf_counter()
        train_run(pair.split, seed, out_root, strengths=wanted, threads=args.threads, log=log)  # type: ignore[attr-defined]
        made[f"{split_name}/s{seed}"] = time.perf_counter() - started
        log(f"fine-tuned {split_name} seed {seed} in {made[f'{split_name}/s{seed}']:.0f} s")
    return made


# ------------------------------------------------------------------------------ evaluation


#: Inversion options added after the cache's version 1 whose default leaves the default inversion
#: unchanged (the reference preset's switches, the run size): left out of the key at that
#: default, so adding an option does not throw away hours of cached inversions.
NEUTRAL_SINCE_V1: dict[str, object] = {"quantize_partial": False, "sample_latent": False,
                                      "resolution": None, "base_recovery": False}


#: The cheap scores of the cache's version 1, kept in the key as they were: a cheap score added
#: since (PIAN) is computed for a cached model when missing (:func:`with_missing_cheap`, seconds
#: per model) instead of throwing away its hours of inversions.
CHEAP_IN_KEY: tuple[str, ...] = ("loss", "pia", "secmi", "contrast")


def eval_key(pair) -> str:
    """Hash of what a model's cached raw values depend on (settings, candidates, images)."""
    import hashlib

    from cgidm_core.inversion import InversionConfig
    from cgidm_core.suite_scores import RECORD_STEPS

    files = [f"{p.parent.name}/{p.name}:{p.stat().st_size}" for p in model_images(pair)]
    config = {k: v for k, v in InversionConfig().to_dict().items()
              if NEUTRAL_SINCE_V1.get(k, object()) != v}
    blob = json.dumps({"config": config, "variants": variants_for(pair),
                       "record": RECORD_STEPS, "cheap": CHEAP_IN_KEY, "files": files,
                       "version": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def variants_for(pair) -> dict[str, dict[str, object]]:
    """Inversions run on a pair: the default everywhere; the display variant (palette bounds)
    only on the pair of the picture grid (strong Van Gogh split A, seed 0), to fit the CPU
    budget of a shared 2-core machine."""
    from cgidm_core.suite_scores import VARIANTS

    full = (pair.split.name, pair.strength, pair.seed) == ("vangogh-a", "strong", 0)
    return dict(VARIANTS) if full else {"default": VARIANTS["default"]}


def model_images(pair) -> list[Path]:
    """Every image scored with a fine-tune: its members, then each hold-out set in turn."""
    files = list(pair.split.members)
    for holdout in pair.split.holdouts.values():
        files += list(holdout)
    return files


def results_path(args: argparse.Namespace, pair) -> Path:
    model = pair.model_dir(args.cache)
    # a LoRA's merged folder is <run>/<steps>/merged: its run folder names it
    name = (f"{pair.run_dir(args.cache).name}-{pair.steps}" if is_lora(pair)
            else f"{model.parent.name}-{model.name}")
    return args.cache / "results" / f"{name}-{eval_key(pair)}.json"


def model_results(args: argparse.Namespace, pair) -> dict | None:
    """Raw values of every image of a fine-tune, from the cache or computed now (and cached).

    ``None`` when another process holds the model's lock (it is computing the same values).
    """
    out = results_path(args, pair)
    if out.is_file():
        with_missing_cheap(pair, out)
        document = with_derived(json.loads(out.read_text()), out.with_suffix(".pt"))
        return with_display_variant(document, display_path(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_suffix(".lock")
    try:
        lock.open("x").write(str(os.getpid()))
    except FileExistsError:
        log(f"{lock} exists: another process is evaluating this model (delete it if not)")
        return None
    try:
        return _compute_results(args, pair, out)
    finally:
        lock.unlink(missing_ok=True)


def has_weights(model: Path) -> bool:
    """Whether a cached fine-tune's weights are at hand (a cache may hold results only)."""
    return (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def with_missing_cheap(pair, out: Path) -> None:
    """Score a cached model's images with the cheap methods added since it was evaluated and
    write them into its cached values (the inversions stay as they were); nothing where the
    model's weights are not at hand (a cache that holds results only)."""
    from benchmarks.cheap_values import add_missing_cheap
    from cgidm_core.api import load_pair
    from cgidm_core.suite_scores import CHEAP_METHODS

    model = pair.model_dir(out.parents[1])
    if not has_weights(model):
        return
    add_missing_cheap(out, CHEAP_METHODS, lambda: load_pair(str(RECIPE_BASE), str(model)),
                      model_images(pair), log=log)


def with_derived(document: dict, pictures_file: Path) -> dict:
    """Add the values computed from the saved pictures (palette-clamped recoveries, the PGD's
    displacement towards the original)."""
    import torch

    from cgidm_core.suite_scores import derived_values

    if pictures_file.is_file():
        pictures = torch.load(pictures_file)
        if "start" not in pictures:
            # Saved before the start was kept. Every pair here is a pixel-space model, whose
            # start is the kept half with the free pixels at 0 (z_start = z0 * keep, decoded
            # by clamping): the same tensor ``invert`` returns as ``start``.
            n = pictures["default/final"].shape[0]
            pictures["start"] = pictures["original"][:n] * pictures["mask"][:n]
        document["values"].update(derived_values(pictures))
    return document


def display_path(results: Path) -> Path:
    """Where ``--display-variant`` keeps a model's palette-bounded inversion values."""
    return results.with_name(results.stem + ".palette.json")


def with_display_variant(document: dict, path: Path) -> dict:
    """Add the values of the palette-bounded inversion run apart (``--display-variant``) on a
    model whose cached run had only the default inversion."""
    if path.is_file() and "palette/final/ssim" not in document["values"]:
        document["values"].update(json.loads(path.read_text())["values"])
    return document


def run_display_variant(args: argparse.Namespace, pairs) -> None:
    """The palette-bounded inversion (``InversionConfig(palette_bounds=True)``) on the selected
    pairs' fine-tunes, cached next to their results: what the recovered pictures look like
    with each channel kept in the range the kept half of the image shows, members vs controls,
    beyond the one pair the full run makes it on."""
    import torch

    from cgidm_core.api import load_pair
    from cgidm_core.images import load_image
    from cgidm_core.suite_scores import VARIANTS, raw_values, saturated_fraction

    seen: set[Path] = set()
    for pair in pairs:
        out = results_path(args, pair)
        target = display_path(out)
        if out in seen or target.is_file() or not out.is_file():
            continue
        seen.add(out)
        if "palette/final/ssim" in json.loads(out.read_text())["values"]:
            continue
        model = pair.model_dir(args.cache)
        log(f"palette-bounded inversion of {model.parent.name}/{model.name}")
        started = time.perf_counter()
        raw = raw_values(load_pair(str(RECIPE_BASE), str(model)),
                         [load_image(p) for p in model_images(pair)],
                         variants={"palette": VARIANTS["palette"]}, cheap=(), keep_pictures=True)
        pictures = raw["pictures"]
        raw["values"]["palette/final/saturated"] = saturated_fraction(
            pictures["palette/final"], pictures["mask"])
        target.write_text(json.dumps({
            "values": raw["values"], "seconds": raw["seconds"], "torch_threads":
            torch.get_num_threads(), "load_average": os.getloadavg()[0]}))
        log(f"  done in {time.perf_counter() - started:.0f} s")


def _compute_results(args: argparse.Namespace, pair, out: Path) -> dict:
    import torch

    from cgidm_core.api import load_pair
    from cgidm_core.images import load_image
    from cgidm_core.suite_scores import raw_values

    model = pair.model_dir(args.cache)
    files = model_images(pair)
    log(f"evaluating {model.parent.name}/{model.name}: {len(files)} images")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    loaded = load_pair(str(RECIPE_BASE), str(model))
    raw = raw_values(loaded, [load_image(p) for p in files], variants=variants_for(pair),
                     keep_pictures=True, log=log)
    document = {
        "model": str(model), "files": [f"{p.parent.name}/{p.name}" for p in files],
        "n_members": len(pair.split.members),
        "holdouts": {k: len(v) for k, v in pair.split.holdouts.items()},
        "values": raw["values"], "seconds": raw["seconds"],
        "seconds_total": time.perf_counter() - started,
        "load_average": [load, os.getloadavg()[0]], "torch_threads": torch.get_num_threads(),
        "inversion": raw["inversion"], "variants": raw["variants"],
        "training": json.loads((model / "training.json").read_text()),
    }
    torch.save(raw["pictures"], out.with_suffix(".pt"))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(out)
    log(f"  done in {document['seconds_total']:.0f} s")
    return with_derived(document, out.with_suffix(".pt"))


RECIPE_BASE = "demo-base"


#: Rows of the picture grid: the recoveries compared (label, key in the cached pictures).
GRID_ROWS = (
    ("original", "original"),
    ("recovered, default inversion (verdict)", "default/final"),
    ("the same, colours clamped to the kept half's range per channel", "default/clamped"),
    ("recovered by an inversion bounded to that range (palette_bounds)", "palette/final"),
)


def write_grid(pictures_file: Path, pair, out: Path, columns: int = 5) -> None:
    """Members (left) and controls (right) of one pair, one row per recovery, 4x enlarged."""
    import torch
    from PIL import Image, ImageDraw

    from cgidm_core.images import to_pil
    from cgidm_core.suite_scores import palette_clamp

    pictures = torch.load(pictures_file)
    n = pictures["default/final"].shape[0]
    pictures["original"], pictures["mask"] = pictures["original"][:n], pictures["mask"][:n]
    pictures["default/clamped"] = palette_clamp(pictures["original"], pictures["default/final"],
                                                pictures["mask"])
    n1 = len(pair.split.members)
    members = list(range(min(columns, n1)))
    controls = list(range(n1, n1 + min(columns, len(pair.holdout_files))))
    rows = [(label, key) for label, key in GRID_ROWS if key in pictures]
    scale, gap, label_h = 4, 16, 14
    size = pictures["original"].shape[-1] * scale
    width = 2 * columns * (size + 2) + gap
    canvas = Image.new("RGB", (width, label_h + len(rows) * (size + label_h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((0, 0), "members (in the fine-tuning set)", fill="black")
    draw.text((columns * (size + 2) + gap, 0), "controls (hold-out)", fill="black")
    for r, (label, key) in enumerate(rows):
        top = label_h + r * (size + label_h + 2)
        draw.text((0, top), label, fill="black")
        images = to_pil(pictures[key])
        for c, i in enumerate(members + controls):
            left = c * (size + 2) + (gap if c >= len(members) else 0)
            image = images[i].resize((size, size), Image.Resampling.NEAREST)
            canvas.paste(image, (left, top + label_h))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    log(f"wrote {out}")


def wait_and_evaluate(args: argparse.Namespace, pairs) -> None:
    """Evaluate each fine-tune once it exists, until every one is evaluated (or locked)."""
    while True:
        pending = [p for p in pairs if not results_path(args, p).is_file()
                   and not results_path(args, p).with_suffix(".lock").exists()]
        ready = [p for p in pending if (p.model_dir(args.cache) / "training.json").is_file()]
        ready.sort(key=lambda p: (p.seed, p.strength != "strong"))  # the grid's pair early
        if ready:
            model_results(args, ready[0])
        elif pending:
            time.sleep(20)
        else:
            return


def _shown_arguments(argv: list[str]) -> list[str]:
    """The command line for the report, without where the JSON copy went (a local path)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            out.append(arg)
    return out


@dataclass(frozen=True)
class LatentPairView:
    """A latent suite pair (``cgidm_core.latent_suite_pairs``) as :func:`evaluate_pair` reads a
    pair: one hold-out set, its recipe group, its family, its strength (training steps)."""

    pair_id: str
    recipe_group: str
    steps: int
    holdout: str = "holdout"
    family: str = "latent"

    @property
    def strength(self) -> str:
        return str(self.steps)


def latent_results(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The latent family's pairs from ``benchmarks.latent_suite``'s cache (its pair list, its
    result files, its score columns), and the ids of those not evaluated there yet."""
    from benchmarks import latent_suite
    from benchmarks.null_controls import aligned, null_lookup
    from cgidm_core import latent_suite_pairs as lsp

    results, missing = [], []
    lookup = null_lookup(args.cache, "latent", args.latent_pgd_steps)
    for pair in lsp.latent_suite_pairs(args.data):
        out = latent_suite.results_file(pair, args.cache, args.latent_pgd_steps)
        if not out.is_file():
            missing.append(pair.pair_id)
            continue
        view = LatentPairView(pair.pair_id, pair.group, pair.steps)
        document = json.loads(out.read_text())
        document["null"] = aligned(lookup, document.get("files") or [])
        # every candidate (not only latent_suite's columns): the selection chooses among them
        results.append({**evaluate_pair(document, view, args.n_bootstrap),
                        "memorisation": document.get("memorisation")})
    return results, missing


def memorisation(args: argparse.Namespace, pair, model: Path) -> dict | None:
    """How much the fine-tune learned these members rather than what they share with the
    hold-outs (``cgidm_core.memorisation``, cached); None where its weights are not at hand (a
    cache that holds results only)."""
    from cgidm_core.demo import resolve_model_reference
    from cgidm_core.memorisation import cached_loss_drops

    if not has_weights(model):
        return None
    return cached_loss_drops(args.cache, resolve_model_reference(RECIPE_BASE), model,
                             list(pair.split.members), list(pair.split.holdouts[pair.holdout]))


def run_suite(args: argparse.Namespace, pairs) -> int:
    from benchmarks.render_suite import render

    started = time.perf_counter()
    load = os.getloadavg()[0]
    if args.wait:
        wait_and_evaluate(args, pairs)
    from benchmarks.null_controls import aligned, eligibility, null_lookup, null_pair_results

    pixel_null = null_lookup(args.cache, "pixel")
    documents: dict[str, dict] = {}
    results = []
    missing: dict[str, list[str]] = {"pixel": []}
    for pair in pairs:
        model = pair.model_dir(args.cache)
        if not (model / "training.json").is_file():
            log(f"missing {pair.pair_id}: no fine-tune in the cache (run without --no-train)")
            missing["pixel"].append(f"{pair.pair_id} (not trained)")
            continue
        if args.report_only and not results_path(args, pair).is_file():
            log(f"missing {pair.pair_id}: not evaluated yet (--report-only)")
            missing["pixel"].append(f"{pair.pair_id} (trained, not evaluated)")
            continue
        if str(model) not in documents:
            document = model_results(args, pair)
            if document is None:
                log(f"missing {pair.pair_id}: still being evaluated elsewhere")
                missing["pixel"].append(f"{pair.pair_id} (being evaluated)")
                continue
            # the images' null values (benchmarks.null_controls; a cache of their own)
            document["null"] = aligned(pixel_null, document["files"])
            documents[str(model)] = document
        results.append({**evaluate_pair(documents[str(model)], pair, args.n_bootstrap),
                        "model": str(model),
                        "memorisation": memorisation(args, pair, model)})
    latent: list[dict] = []
    if not args.no_latent:
        latent, missing["latent"] = latent_results(args)
    for family, ids in missing.items():
        if ids:
            log(f"{family}: {len(ids)} pairs missing from the cache {args.cache}")
    if not results:
        log("no pixel pair is cached; nothing to report")
        return 1
    null_results = null_pair_results(args.cache, args.n_bootstrap, args.latent_pgd_steps)
    summary = {
        "pairs": results,
        "null_pairs": null_results,
        "eligibility": eligibility(null_results),
        "latent_pairs": latent,
        "missing": missing,
        "cache": str(args.cache),
        "models": {k: {"seconds": v["seconds"], "seconds_total": v["seconds_total"],
                       "load_average": v["load_average"], "training": v["training"],
                       "files": v["files"]}
                   for k, v in documents.items()},
        "run_seconds": time.perf_counter() - started,
        "load_average": [load, os.getloadavg()[0]],
        "command": "python -m benchmarks.suite " + " ".join(_shown_arguments(sys.argv[1:])),
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if str(args.grid) not in ("", "."):
        grid_pair = next((p for p in pairs if p.pair_id == args.grid_pair), None)
        if grid_pair is not None and results_path(args, grid_pair).with_suffix(".pt").is_file():
            write_grid(results_path(args, grid_pair).with_suffix(".pt"), grid_pair, args.grid)
            summary["grid"] = str(args.grid)
    render(summary, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    pairs = selected_pairs(args)
    if args.list:
        for pair in pairs:
            model = pair.model_dir(args.cache)
            state = "cached" if (model / "training.json").is_file() else "missing"
            print(f"{pair.pair_id:<36} {len(pair.split.members)} members / "
                  f"{len(pair.holdout_files)} hold-out  {state}  {model}")
        return 0
    if not (args.no_train or args.report_only):
        train_missing(args, pairs)
    if args.train_only:
        return 0
    if args.display_variant:
        run_display_variant(args, pairs)
    return run_suite(args, pairs)


if __name__ == "__main__":
    sys.exit(main())
