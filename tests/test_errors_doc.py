"""docs/ERRORS.md against the code: one exception tree per floor, every class in the table with
its code and HTTP status, and every error code the gateway can answer or a failed job can carry
in its table, with no row the code no longer makes.

Read from the source (ast), not by importing it: the four packages' modules need no settings,
no torch and no app to be checked, and a class or code added anywhere is found by where it is
raised, not by a list kept beside it.
"""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass, field

from tests.paths import REPO_ROOT

DOC = REPO_ROOT / "docs" / "ERRORS.md"
PACKAGES = ("cgidm_core", "cgidm", "app", "worker")
SERVICE_PACKAGES = ("cgidm", "app", "worker")
LIBRARY_BASE, SERVICE_BASE = "cgidm_core.errors.CGIDMError", "cgidm.errors.CgidmServiceError"
#: Calls that make an HTTP error answer: (file, function name) -> (status arg, code arg). ``None``
#: as file: any file of the gateway.
API_ERROR_CALLS = {(None, "ApiError"): (0, 2), ("app/model_upload.py", "_field_error"): (0, 2),
                   ("app/uploads.py", "bad"): (None, 0)}
#: Codes of the error handlers' own bodies (app/errors.py, app/main.py).
HANDLER_CODES = {"http_error", "internal_error"}
#: Errors whose code is chosen where they are raised (first argument).
CODED_ERRORS = ("ModelFileError", "ModelFetchError")
_BUILTIN_EXCEPTIONS = {name for name in dir(builtins) if isinstance(getattr(builtins, name), type)
                       and issubclass(getattr(builtins, name), BaseException)
                       and not issubclass(getattr(builtins, name), Warning)}


@dataclass
class ExceptionClass:
    qualname: str
    bases: list[str]
    attributes: dict[str, object] = field(default_factory=dict)


def _sources(*packages: str) -> dict[str, ast.Module]:
    return {str(path.relative_to(REPO_ROOT)): ast.parse(path.read_text(), str(path))
            for package in packages for path in sorted((REPO_ROOT / package).rglob("*.py"))}


SOURCES = _sources(*PACKAGES)


def _module(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _class_attributes(node: ast.ClassDef) -> dict[str, object]:
    """``code = "x"`` and ``code, http_status = "x", 503`` in a class body."""
    found: dict[str, object] = {}
    for statement in node.body:
        if not isinstance(statement, ast.Assign | ast.AnnAssign):
            continue
        target = statement.targets[0] if isinstance(statement, ast.Assign) else statement.target
        value = statement.value
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            found[target.id] = value.value
        elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            for name, item in zip(target.elts, value.elts, strict=True):
                if isinstance(name, ast.Name) and isinstance(item, ast.Constant):
                    found[name.id] = item.value
    return found


def exception_classes() -> dict[str, ExceptionClass]:
    """Every exception class (not warnings) defined in the four packages, by qualified name;
    bases by their simple names."""
    candidates: dict[str, ExceptionClass] = {}
    for path, tree in SOURCES.items():
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "?")
                         for b in node.bases]
                candidates[f"{_module(path)}.{node.name}"] = ExceptionClass(
                    f"{_module(path)}.{node.name}", bases, _class_attributes(node))
    known, found = set(_BUILTIN_EXCEPTIONS), {}
    while True:
        new = {name: cls for name, cls in candidates.items()
               if name not in found and any(base in known for base in cls.bases)}
        if not new:
            return found
        found.update(new)
        known.update(name.rsplit(".", 1)[-1] for name in new)


def _by_simple_name(classes: dict[str, ExceptionClass]) -> dict[str, ExceptionClass]:
    return {name.rsplit(".", 1)[-1]: cls for name, cls in classes.items()}


def _inherited(cls: ExceptionClass, simple: dict[str, ExceptionClass], attribute: str) -> object:
    if attribute in cls.attributes:
        return cls.attributes[attribute]
    for base in cls.bases:
        if base in simple:
            value = _inherited(simple[base], simple, attribute)
            if value is not _MISSING:
                return value
    return _MISSING


_MISSING = object()


def _ancestors(cls: ExceptionClass, simple: dict[str, ExceptionClass]) -> set[str]:
    names = set()
    for base in cls.bases:
        if base in simple:
            names |= {simple[base].qualname} | _ancestors(simple[base], simple)
    return names


def _table(heading: str) -> list[list[str]]:
    """The rows of the first table under ``## heading``, cells stripped of backticks."""
    text = DOC.read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows]


def _literals(node: ast.expr, where: str) -> list[str]:
    """The code(s) an argument can be: a string, either branch of ``a if c else b``; a name or
    ``exc.code`` is a code forwarded from elsewhere (checked where it is made)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _literals(node.body, where) + _literals(node.orelse, where)
    if isinstance(node, ast.Name) or (isinstance(node, ast.Attribute) and node.attr == "code"):
        return []
    raise AssertionError(f"{where}: an error code that is neither a literal nor forwarded "
                         f"({ast.unparse(node)}); write it as a string so docs/ERRORS.md can "
                         "be checked")


def _calls(packages: tuple[str, ...]) -> list[tuple[str, ast.Call, str]]:
    return [(path, node, getattr(node.func, "id", getattr(node.func, "attr", "")))
            for path, tree in SOURCES.items() if path.split("/", 1)[0] in packages
            for node in ast.walk(tree) if isinstance(node, ast.Call)]


def api_codes() -> dict[str, set[int]]:
    """Every ``detail[].type`` the gateway can answer, with the statuses it is answered with."""
    codes: dict[str, set[int]] = {code: set() for code in HANDLER_CODES}
    for path, call, name in _calls(("app",)):
        positions = API_ERROR_CALLS.get((None, name)) or API_ERROR_CALLS.get((path, name))
        if positions is None:
            continue
        status_at, code_at = positions
        where = f"{path}:{call.lineno}"
        for code in _literals(call.args[code_at], where):
            statuses = codes.setdefault(code, set())
            if status_at is not None and isinstance(call.args[status_at], ast.Constant):
                statuses.add(call.args[status_at].value)
            elif status_at is None:
                statuses.add(422)  # app/uploads.py: every image refusal is a 422
    # ModelFileError's codes reach POST /models as they are (app/model_upload.py _file_error)
    for path, call, name in _calls(("cgidm",)):
        if name == "ModelFileError":
            for code in _literals(call.args[0], f"{path}:{call.lineno}"):
                codes.setdefault(code, set()).add(415 if code == "pickle_checkpoint" else 422)
    return codes


def job_codes() -> set[str]:
    """Every ``error.code`` a failed job can carry: the literal codes of ``JobError``, the
    coded errors (forwarded by worker/job_runner.py) and the library's classes' codes."""
    codes: set[str] = set()
    for path, call, name in _calls(SERVICE_PACKAGES):
        where = f"{path}:{call.lineno}"
        if name == "JobError":
            for keyword in call.keywords:
                if keyword.arg == "code":
                    codes.update(_literals(keyword.value, where))
        elif name in CODED_ERRORS and call.args:
            codes.update(_literals(call.args[0], where))
    classes = exception_classes()
    simple = _by_simple_name(classes)
    for name, cls in classes.items():
        if name == LIBRARY_BASE or LIBRARY_BASE in _ancestors(cls, simple):
            codes.add(str(_inherited(cls, simple, "code")))
    return codes


# ------------------------------------------------------------------------------------------


def test_every_service_error_derives_from_the_service_base():
    classes = exception_classes()
    simple = _by_simple_name(classes)
    outside = sorted(name for name, cls in classes.items()
                     if name.split(".", 1)[0] in SERVICE_PACKAGES and name != SERVICE_BASE
                     and SERVICE_BASE not in _ancestors(cls, simple))
    assert not outside, f"derive these from {SERVICE_BASE} (or a class under it): {outside}"
    library = sorted(name for name, cls in classes.items() if name.startswith("cgidm_core.")
                     and name != LIBRARY_BASE and LIBRARY_BASE not in _ancestors(cls, simple))
    assert not library, f"derive these from {LIBRARY_BASE}: {library}"


def test_the_class_table_lists_every_class_with_its_code_and_status():
    classes = exception_classes()
    simple = _by_simple_name(classes)
    rows = {row[0]: row for row in _table("Exception classes")}
    assert set(rows) == set(classes), (
        f"missing from docs/ERRORS.md: {sorted(set(classes) - set(rows))}; "
        f"no longer in the code: {sorted(set(rows) - set(classes))}")
    for name, (_, _, status, code, advice) in rows.items():
        cls = classes[name]
        assert advice, f"{name}: say what the user should do"
        if not code.startswith("("):
            assert code == _inherited(cls, simple, "code"), name
        if not status.startswith("("):
            expected = _inherited(cls, simple, "http_status")
            assert status == ("—" if expected in (None, _MISSING) else str(expected)), name


def test_every_code_the_api_can_answer_is_in_the_table():
    found = api_codes()
    rows = {row[0]: row for row in _table("Codes in API answers") if not row[0].startswith("*")}
    assert set(found) <= set(rows), f"add to docs/ERRORS.md: {sorted(set(found) - set(rows))}"
    assert set(rows) <= set(found), f"no longer answered: {sorted(set(rows) - set(found))}"
    for code, statuses in found.items():
        documented = {int(s) for s in re.findall(r"\d{3}", rows[code][1])}
        assert statuses <= documented, (code, statuses, documented)
        assert rows[code][2], f"{code}: say what the user should do"


def test_every_code_a_failed_job_can_carry_is_in_the_table():
    found = job_codes()
    rows = {row[0]: row for row in _table("Codes of failed jobs (`error.code`)")}
    assert found <= set(rows), f"add to docs/ERRORS.md: {sorted(found - set(rows))}"
    assert set(rows) <= found, f"no job fails with these any more: {sorted(set(rows) - found)}"
    assert all(row[1] for row in rows.values())


def test_model_file_and_fetch_errors_share_one_coded_shape():
    """Both were ``(code, message)`` classes of their own; now both are CodedError."""
    from cgidm.errors import CodedError
    from cgidm.model_fetch import ModelFetchError
    from cgidm.model_files import ModelFileError

    for cls in (ModelFileError, ModelFetchError):
        error = cls("hub_unavailable", "the site answered 502")
        assert isinstance(error, CodedError) and error.code == "hub_unavailable"
        assert str(error) == "the site answered 502"
    assert isinstance(ModelFileError("x", "y"), ValueError)  # as before
