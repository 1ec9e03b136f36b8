"""Where tests find the real images: ``../shared/data`` beside the repository's root."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def require_shared_data(*parts: str) -> Path:
    """``SHARED_DATA / parts``, failing the test with a message when it is missing.

    A missing ../shared/data is a broken set-up, reported as a failure, never as a skip: a
    skipped test reads as a pass in a summary nobody looks at twice.
    """
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_dir():
        pytest.fail(f"{path} is missing: this test reads the shared data next to the repository "
                    "(../shared/data, from any /work/<dir> checkout /work/shared/data)")
    return path
