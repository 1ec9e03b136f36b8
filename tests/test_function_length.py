"""No function in the library, the shared layer, the gateway or the worker is over 80 lines.

A function that does many things in one breath (HTTP parsing, validation, storage and queueing;
checking, batching, retrying and scoring) is where the next change goes wrong: a reader cannot
see which step a line belongs to. Long ones are split into named steps (``cgidm_core.api``'s
``authenticate`` calls ``_prepare_run``, ``_inverted_batches`` and ``_batch_results``) or read as
short numbered steps. The count is of source lines from ``def`` to the function's last line,
docstring and comments included, read with :mod:`ast`.
There are no exceptions: the last long function (the family dispatch in ``models/loading.py``)
went with the family registry.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from tests.paths import REPO_ROOT

MAX_LINES = 80
PACKAGES = ("cgidm_core", "cgidm", "app", "worker")



def _functions(path: Path) -> list[tuple[str, int, int]]:
    """(name, first line, length in lines) of every function and method in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.name, node.lineno, node.end_lineno - node.lineno + 1)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno is not None]


@cache
def _long_functions() -> dict[str, int]:
    """"path:function" -> lines, of every function over the limit (read once per session)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT).as_posix()
            for name, _line, length in _functions(path):
                if length > MAX_LINES:
                    found[f"{relative}:{name}"] = length
    return found


def test_no_function_is_over_the_limit():
    too_long = _long_functions()
    assert not too_long, (
        f"functions over {MAX_LINES} lines: {too_long}; split them into named steps "
        "(see cgidm_core/api.py authenticate) or number their steps in fewer lines")


def test_the_scan_sees_a_long_function(tmp_path):
    source = tmp_path / "long.py"
    source.write_text("def long():\n" + "    x = 1\n" * MAX_LINES + "    return x\n")
    assert _functions(source) == [("long", 1, MAX_LINES + 2)]
