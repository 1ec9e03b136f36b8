"""docs/ARCHITECTURE.md's floor table says what the import-direction test enforces.

The map is only useful while it is true: this reads the table of floors (the one after the
``floors:`` marker) and compares each row's "may import" column with ``ALLOWED`` in
``tests/test_import_directions.py``, so a floor added or allowed a new arrow changes both.
"""

from __future__ import annotations

import re

from tests.paths import REPO_ROOT
from tests.test_import_directions import ALLOWED

DOC = REPO_ROOT / "docs" / "ARCHITECTURE.md"


def _floor_table() -> dict[str, frozenset[str]]:
    text = DOC.read_text()
    start = text.index("<!-- floors:")
    rows: dict[str, frozenset[str]] = {}
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        floor = re.fullmatch(r"`(\w+)`", cells[0])
        if floor:
            rows[floor.group(1)] = frozenset(re.findall(r"`(\w+)`", cells[2]))
    return rows


def test_the_floor_table_matches_the_import_rules():
    table = _floor_table()
    assert set(table) == set(ALLOWED), "docs/ARCHITECTURE.md names other floors than ALLOWED"
    for floor, allowed in ALLOWED.items():
        assert table[floor] == allowed, f"{floor}: the doc says {sorted(table[floor])}, the " \
            f"import test allows {sorted(allowed)}"


def test_the_files_the_map_names_exist():
    text = DOC.read_text()
    for path in set(re.findall(r"`((?:cgidm_core|cgidm|app|worker|tests|docker)/[\w/.-]+\.\w+)`",
                               text)):
        assert (REPO_ROOT / path).is_file(), path
