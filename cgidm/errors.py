"""The base of every error the service layer (``cgidm``, ``app``, ``worker``) raises on purpose.

Beside the library's tree (``cgidm_core.errors.CGIDMError``): a caller that wants "anything
cgidm refused" catches the two bases, ``except (CGIDMError, CgidmServiceError)``. Each class has
a stable ``code`` (what an HTTP error's ``type`` or a failed job's ``error.code`` says) and, where
the gateway answers it as such, the ``http_status``. Classes that were a ``ValueError`` or
``LookupError`` before stay one too, so existing ``except`` clauses keep working.

docs/ERRORS.md is the table of every class and every code, with what the user should do;
tests/test_errors_doc.py checks it against the code.
"""

from __future__ import annotations


class CgidmServiceError(Exception):
    """Base of the service layer's errors. The message says what to do next."""

    #: Stable, machine-readable name of the cause.
    code: str = "service_error"
    #: The HTTP status the gateway answers this error with; ``None``: never answered as such
    #: (the worker, the CLI, start-up).
    http_status: int | None = None


class CodedError(CgidmServiceError):
    """An error whose code is chosen where it is raised (one class, many causes): the code names
    the cause in one word, the message how to fix it."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
