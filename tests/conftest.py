"""Shared fixtures. Tests never reach the network: the Hub is switched off before any import.

Tiny models run fastest on one CPU thread (thread hand-offs cost more than the arithmetic, and
the test machine's cores are shared); set OMP_NUM_THREADS to override.
"""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Results are signed (cgidm.result_signing): the tests' processes share one throwaway key
# instead of making one in the user's ~/.config. Made on first use, atomically.
os.environ.setdefault("CGIDM_SIGNING_KEY", os.path.join(
    tempfile.gettempdir(), f"cgidm-tests-{os.getuid()}", "signing-key.pem"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ddpm_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(pretrained_dir, finetuned_dir) of two tiny pixel-space DDPM pipelines."""
    from cgidm_testkit import tinymodels  # imports torch: only for the tests that use models

    return tinymodels.make_tiny_ddpm_pair(tmp_path_factory.mktemp("ddpm"))


@pytest.fixture(scope="session")
def tiny_sd_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(pretrained_dir, finetuned_dir): a tiny SD pipeline and a full fine-tuned copy of it."""
    from cgidm_testkit import tinymodels

    root = tmp_path_factory.mktemp("sd")
    base = tinymodels.make_tiny_sd(root / "base")
    return base, tinymodels.make_full_finetune(base, root / "finetuned")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move everything collection imported (torch, diffusers, transformers: millions of objects)
    out of the garbage collector's sight. Pairs call ``gc.collect()`` when they release their
    text encoders, and a full collection that walks every imported module costs ~0.3 s each
    time; objects made by the tests themselves are still collected as before."""
    import gc

    gc.collect()
    gc.freeze()
