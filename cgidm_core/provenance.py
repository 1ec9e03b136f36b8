"""What a result was computed from, precisely enough for someone else to re-run it.

Evidence in a complaint must say what was compared with what. Every result (library, CLI,
service) carries a ``provenance`` document:

- ``inputs``: each image's sha256 *as received* (the file's bytes; for an in-memory picture, its
  mode, size and pixels, marked ``"of": "pixels"``);
- ``models``: every file each model was loaded from (each file of a folder) with its size and
  sha256;
- ``prompt`` and ``prompt_source``; ``method``: every inversion setting (seed included), the
  score metric, the metrics, the batch size;
- ``device`` and ``dtype``; ``software``: cgidm's version (and git commit when run from a
  checkout), Python, torch, diffusers, transformers and peft versions.

``cgidm verify`` (``cgidm/commands/verify.py``) checks a record against files and re-runs it.
Hashing a model reads all of its bytes (about 1 s per GB); it happens once per load (the pair
remembers it) and file hashes are memoised by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import io
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:  # annotations only
    from .inversion_config import InversionConfig
    from .pair import ModelPair

CHUNK = 4 * 1024 * 1024


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised while its size and modification time stay)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _file_sha256(str(resolved), stat.st_size, stat.st_mtime_ns)


def model_files(path: str | Path) -> list[dict[str, Any]]:
    """``[{"path", "bytes", "sha256"}]`` for a model file, or for every file under a model
    folder (sorted, paths relative to the folder; links are followed)."""
    root = Path(path)
    if root.is_file():
        return [{"path": root.name, "bytes": root.stat().st_size, "sha256": file_sha256(root)}]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size,
             "sha256": file_sha256(p)} for p in files]


def describe_model(reference: str | Path, path: str | Path) -> dict[str, Any]:
    """A model as the user named it, where it was read from, and the hash of each file."""
    return {"reference": str(reference), "path": str(path), "files": model_files(path)}


def image_hash(source: Any) -> dict[str, str]:
    """sha256 of an image source as received: a file's or a buffer's bytes, else the pixels."""
    if isinstance(source, bytes):
        return {"sha256": sha256_bytes(source), "of": "bytes"}
    if isinstance(source, str | Path):
        return {"sha256": file_sha256(source), "of": "file"}
    if isinstance(source, Image.Image):
        digest = hashlib.sha256(f"{source.mode} {source.size[0]}x{source.size[1]}\n".encode())
        digest.update(source.tobytes())
        return {"sha256": digest.hexdigest(), "of": "pixels"}
    buffer = io.BytesIO()
    Image.fromarray(source).save(buffer, format="PNG")  # arrays: their lossless PNG
    return {"sha256": sha256_bytes(buffer.getvalue()), "of": "pixels"}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> dict[str, Any] | None:
    """The checkout's commit (and whether files differ from it), when run from a git checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": bool(dirty)}


@lru_cache(maxsize=1)
def software() -> dict[str, Any]:
    out: dict[str, Any] = {
        "cgidm": _version("cgidm"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for package in ("torch", "diffusers", "transformers", "peft", "numpy", "pillow"):
        out[package] = _version(package)
    out["git"] = git_commit()
    return out


def build(pair: ModelPair, images: Sequence[Any], names: Sequence[str], *, prompt: str | None,
          prompt_source: str, config: InversionConfig, score_metric: str, metrics: Sequence[str],
          batch_size: int) -> dict[str, Any]:
    """The provenance document of one ``authenticate`` call."""
    return {
        "created_at": datetime.now(timezone.utc).isoformat(),
        "inputs": [{"name": name, **image_hash(source)}
                   for name, source in zip(names, images, strict=True)],
        "models": pair.sources,
        "prompt": prompt,
        "prompt_source": prompt_source,
        "method": {"inversion": config.to_dict(), "seed": config.seed,
                   "score_metric": score_metric, "metrics": list(metrics),
                   "batch_size": batch_size},
        "device": str(pair.device),
        "dtype": str(pair.dtype).replace("torch.", ""),
        "family": pair.family,
        "finetuned_kind": getattr(pair, "finetuned_kind", None),
        "software": software(),
    }
