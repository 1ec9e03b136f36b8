"""The benchmark suite's pixel pairs: which images each pair is fine-tuned on, how, and where the
fine-tunes are cached.

Why this lives in the library and not in the benchmark script: ``benchmarks/suite.py`` and
``cgidm eval --suite-pair`` must build exactly the same pair from the same recipe, and a test has
to be able to check the splits without running a benchmark.

A pair is (dataset split, strength, seed). Every pair is a full fine-tune of ``demo-base`` on the
split's members with one recipe (AdamW, constant learning rate after a fixed warm-up, random
horizontal flips: a recipe the defaults were NOT tuned on). The strengths are step counts of the
same run: with a constant learning rate and a fixed warm-up, the weights after 200 steps of a
1000-step run are exactly those of a 200-step run, so one run per (split, seed) yields the light,
medium and strong pairs. Each pair's folder is keyed by a hash of its recipe and data, so a
changed recipe never reuses a stale fine-tune.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, ImageInputError
from .names import IMAGE_SUFFIXES

#: Fine-tuning steps of each strength (checkpoints of one run).
STRENGTHS: dict[str, int] = {"light": 200, "medium": 500, "strong": 1000}
SEEDS: tuple[int, ...] = (0, 1)

#: The recipe shared by every suite fine-tune (see the module docstring).
RECIPE: dict[str, object] = {
    "base": "demo-base",
    "batch_size": 10,
    "learning_rate": 2e-4,
    "warmup_steps": 20,
    "lr_schedule": "constant_with_warmup",
    "flip": True,
    "grad_clip": 1.0,
}

#: DreamBooth subjects fine-tuned on (2 photos each, the first by file name), and subjects whose
#: photos are the easy hold-out (2 each). The hard hold-out is the remaining photos of the member
#: subjects: the same object, other shots.
DREAMBOOTH_MEMBER_SUBJECTS = ("backpack", "berry_bowl", "cat", "clock", "dog")
DREAMBOOTH_OTHER_SUBJECTS = ("bear_plushie", "can", "colorful_sneaker", "fancy_boot", "rc_car")
DREAMBOOTH_PHOTOS_PER_MEMBER_SUBJECT = 2
DREAMBOOTH_PHOTOS_PER_OTHER_SUBJECT = 2
#: Photos per member subject in the hard hold-out (the next ones by file name): 10 in all, the
#: size of the other hold-out sets, which keeps the suite inside its CPU budget.
DREAMBOOTH_HARD_PER_SUBJECT = 2


def default_data_root() -> Path:
    """``../shared/data`` from the repository root (or ``$CGIDM_DATA``)."""
    env = os.environ.get("CGIDM_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def default_cache() -> Path:
    """Fine-tunes and per-pair results: ``~/.cache/cgidm/suite`` (or ``$CGIDM_SUITE_CACHE``)."""
    env = os.environ.get("CGIDM_SUITE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cgidm" / "suite"


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ImageInputError(f"{folder}: no such folder; the suite needs ../shared/data")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageInputError(f"{folder}: no images")
    return files


@dataclass(frozen=True)
class Split:
    """Members (trained on) and one or more named hold-out sets of one data set."""

    name: str
    description: str
    members: tuple[Path, ...]
    holdouts: dict[str, tuple[Path, ...]] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Hash of the member files' names and sizes: the data part of a fine-tune's key."""
        h = hashlib.sha256()
        for p in self.members:
            h.update(f"{p.parent.name}/{p.name}:{p.stat().st_size}\n".encode())
        return h.hexdigest()[:12]


def splits(data_root: Path | None = None) -> dict[str, Split]:
    """The suite's data splits, built from ``../shared/data``."""
    root = Path(data_root) if data_root is not None else default_data_root()
    vg = root / "wikiart-vangogh"
    a_members, a_holdout = _images(vg / "membership"), _images(vg / "hold_out")
    db = root / "dreambooth-subjects"
    db_members: list[Path] = []
    hard: list[Path] = []
    easy: list[Path] = []
    for subject in DREAMBOOTH_MEMBER_SUBJECTS:
        photos = _images(db / subject)
        db_members += photos[:DREAMBOOTH_PHOTOS_PER_MEMBER_SUBJECT]
        first = DREAMBOOTH_PHOTOS_PER_MEMBER_SUBJECT
        hard += photos[first:first + DREAMBOOTH_HARD_PER_SUBJECT]
    for subject in DREAMBOOTH_OTHER_SUBJECTS:
        easy += _images(db / subject)[:DREAMBOOTH_PHOTOS_PER_OTHER_SUBJECT]
    return {
        "vangogh-a": Split(
            "vangogh-a", "Van Gogh, the authors' split (10 members / 10 hold-out paintings)",
            tuple(a_members), {"holdout": tuple(a_holdout)},
        ),
        "vangogh-b": Split(
            "vangogh-b", "Van Gogh, swapped split (the authors' hold-out are the members)",
            tuple(a_holdout), {"holdout": tuple(a_members)},
        ),
        "dreambooth": Split(
            "dreambooth",
            f"DreamBooth photos: members {DREAMBOOTH_PHOTOS_PER_MEMBER_SUBJECT} photos each of "
            f"{', '.join(DREAMBOOTH_MEMBER_SUBJECTS)}; hard hold-out = "
            f"{DREAMBOOTH_HARD_PER_SUBJECT} other photos of each of them; easy "
            f"hold-out = {DREAMBOOTH_PHOTOS_PER_OTHER_SUBJECT} photos each of "
            f"{', '.join(DREAMBOOTH_OTHER_SUBJECTS)}",
            tuple(db_members), {"hard": tuple(hard), "easy": tuple(easy)},
        ),
    }


def recipe_group(split: str, holdout: str) -> str:
    """The recipe group of a pixel pair of this module: its data split, and for a split with
    several hold-out sets the hold-out too (``vangogh-a``, ``vangogh-b``, ``dreambooth-hard``,
    ``dreambooth-easy``). Held-out numbers (:mod:`cgidm_core.held_out`) leave one group out
    at a time, so pairs that share images and recipe never sit on both sides of a fold."""
    return split if split.startswith("vangogh") else f"{split}-{holdout}"


@dataclass(frozen=True)
class SuitePair:
    """One fine-tune of the suite and the hold-out set it is evaluated against.

    ``group`` is the pair's recipe group for leave-one-group-out choices (set by whoever
    defines the pair: :func:`suite_pairs` uses :func:`recipe_group`; pairs of other recipes,
    LoRA or DreamBooth ones, name their own); ``family`` is the model family the suite reports
    apart (``pixel`` here)."""

    split: Split
    strength: str
    seed: int
    holdout: str
    group: str = ""
    family: str = "pixel"

    @property
    def recipe_group(self) -> str:
        return self.group or recipe_group(self.split.name, self.holdout)

    @property
    def steps(self) -> int:
        return STRENGTHS[self.strength]

    @property
    def pair_id(self) -> str:
        """Stable name, e.g. ``vangogh-a/strong/s0/holdout``."""
        return f"{self.split.name}/{self.strength}/s{self.seed}/{self.holdout}"

    @property
    def run_key(self) -> str:
        """Key of the training run (split data + recipe + seed), shared by the strengths."""
        blob = json.dumps({"recipe": RECIPE, "data": self.split.fingerprint(),
                           "seed": self.seed, "max_steps": max(STRENGTHS.values())},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def model_dir(self, cache: Path) -> Path:
        """Folder of this pair's fine-tune (a DDPMPipeline folder)."""
        return cache / "models" / f"{self.split.name}-s{self.seed}-{self.run_key}" / self.strength

    @property
    def holdout_files(self) -> tuple[Path, ...]:
        return self.split.holdouts[self.holdout]


def suite_pairs(
    data_root: Path | None = None,
    *,
    datasets: tuple[str, ...] | None = None,
    strengths: tuple[str, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
) -> list[SuitePair]:
    """Every pair of the suite (or a subset), in a fixed order."""
    all_splits = splits(data_root)
    chosen = datasets or tuple(all_splits)
    for name in chosen:
        if name not in all_splits:
            raise ConfigError(
                f"unknown suite data set {name!r}; choose from {', '.join(all_splits)}"
            )
    for s in strengths or ():
        if s not in STRENGTHS:
            raise ConfigError(f"unknown strength {s!r}; choose from {', '.join(STRENGTHS)}")
    out = []
    for name in chosen:
        split = all_splits[name]
        for strength in strengths or tuple(STRENGTHS):
            for seed in seeds or SEEDS:
                for holdout in split.holdouts:
                    out.append(SuitePair(split, strength, seed, holdout,
                                         group=recipe_group(name, holdout)))
    return out


def find_pair(pair_id: str, data_root: Path | None = None) -> SuitePair:
    """The pair named ``split/strength/s<seed>/<holdout>`` (the holdout part may be omitted)."""
    parts = pair_id.strip("/").split("/")
    if len(parts) not in (3, 4) or not parts[2].startswith("s"):
        raise ConfigError(
            f"suite pair {pair_id!r} is not of the form split/strength/s<seed>[/holdout], "
            "e.g. vangogh-a/strong/s0"
        )
    for pair in suite_pairs(data_root):
        name = pair.pair_id.split("/")
        if name[:3] == parts[:3] and (len(parts) == 3 or name[3] == parts[3]):
            return pair
    raise ConfigError(f"no suite pair {pair_id!r}; run `python -m benchmarks.suite --list`")


def train_run(
    split: Split,
    seed: int,
    out_root: Path,
    *,
    strengths: dict[str, int] | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Fine-tune ``demo-base`` on ``split.members``, saving a checkpoint at every strength.

    Writes ``<out_root>/<strength>/`` (DDPMPipeline + ``training.json``). Strengths whose folder
    already holds a ``training.json`` are kept; the run still has to replay the steps before
    the last missing checkpoint, so a partial cache is only as cheap as its earliest gap.
    """
    import time

    import numpy as np
    import torch

    from . import training
    from .demo import resolve_model_reference
    from .images import load_image, to_tensor

    strengths = strengths or STRENGTHS
    wanted = {name: steps for name, steps in strengths.items()
              if not (out_root / name / "training.json").is_file()}
    done = {name: out_root / name for name in strengths if name not in wanted}
    if not wanted:
        return done
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    unet, scheduler = training.load_pipeline_parts(resolve_model_reference(str(RECIPE["base"])))
    images = to_tensor([load_image(p) for p in split.members], unet.config.sample_size)
    data = training.FixedImages(images, seed=seed, flip=bool(RECIPE["flip"]))
    last = max(wanted.values())
    config = training.TrainConfig(
        steps=last, batch_size=int(RECIPE["batch_size"]),  # type: ignore[call-overload]  # RECIPE: literals
        learning_rate=float(RECIPE["learning_rate"]),  # type: ignore[arg-type]  # RECIPE: literals
        seed=seed, warmup_steps=int(RECIPE["warmup_steps"]),  # type: ignore[call-overload]  # RECIPE: literals
        lr_schedule=str(RECIPE["lr_schedule"]), grad_clip=float(RECIPE["grad_clip"]),  # type: ignore[arg-type]  # RECIPE: literals
    )
    checkpoints = {steps: name for name, steps in wanted.items()}
    started = time.perf_counter()
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if step in checkpoints:
            name = checkpoints[step]
            folder = out_root / name
            training.save_pipeline(unet, scheduler, folder)
            unet.train()
            facts = {
                "base": RECIPE["base"], "recipe": RECIPE, "seed": seed, "steps": step,
                "split": split.name, "members": [f"{p.parent.name}/{p.name}"
                                                 for p in split.members],
                "epochs": step * config.batch_size / len(split.members),
                "final_loss": float(np.mean(losses[-100:])),
                "seconds": time.perf_counter() - started,
                "torch_threads": torch.get_num_threads(),
                "load_average": os.getloadavg()[0],
            }
            (folder / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
            log(f"saved {folder} after {step} steps ({facts['seconds']:.0f} s)")
            done[name] = folder

    # Warm-up is min(20, steps // 10) = 20 for every strength, so each checkpoint equals a
    # standalone run of that many steps.
    training.train(unet, scheduler, data, config, progress=False, on_step=on_step)
    return done


def recipe_summary() -> dict[str, object]:
    return {**RECIPE, "strengths": STRENGTHS, "seeds": list(SEEDS)}


__all__ = [
    "RECIPE", "STRENGTHS", "SEEDS", "Split", "SuitePair", "recipe_group", "splits",
    "suite_pairs", "find_pair", "train_run", "default_cache", "default_data_root", "recipe_summary",
]
