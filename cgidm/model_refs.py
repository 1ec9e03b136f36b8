"""Suspect models named by their address on a hub: one parser for every way people write one.

A rights holder has a link, not a file. These are accepted wherever a suspect model is named
(``cgidm check/eval``, ``cgidm submit``, the Python client, ``POST /authenticate``), beside local
paths, registry ids and upload ids:

==============================================================  =================================
``hf:OWNER/NAME[@REVISION][:FILE]``                              a Hugging Face repository
``https://huggingface.co/OWNER/NAME[/tree/REV]``                 its page, pasted
``https://huggingface.co/OWNER/NAME/(blob|resolve)/REV/FILE``    one file's page or download URL
``civitai:VERSION_ID``                                           a Civitai model version
``https://civitai.com/models/ID[/slug]?modelVersionId=N``        a version's page, pasted
``https://civitai.com/api/download/models/N``                    a version's download URL
``urn:air:ECOSYSTEM:TYPE:civitai:MODEL@VERSION``                 Civitai's AIR identifier
``urn:air:ECOSYSTEM:TYPE:huggingface:OWNER/NAME``                the same for a Hugging Face repo
==============================================================  =================================

Parsing needs nothing but the text (no network, no torch): the gateway uses it to refuse a
malformed reference with a 4xx before anything is queued, and the fetchers
(``cgidm.model_fetch``) take the parsed :class:`ModelReference`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from cgidm.errors import CgidmServiceError

Site = Literal["hf", "civitai"]

#: The host each site's references name (a mirror set by HF_ENDPOINT or CGIDM_CIVITAI_URL serves
#: the same references; allow-lists name these hosts).
SITE_HOSTS: dict[str, str] = {"hf": "huggingface.co", "civitai": "civitai.com"}
#: ``pretrained`` value for a suspect named by hub reference: the base its hub page records (the
#: registry's base-model table), resolved by the worker once it has the page; the gateway only
#: lets it through.
AUTO_BASE = "auto"

_HF_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}
_CIVITAI_HOSTS = {"civitai.com", "www.civitai.com"}
#: Hugging Face repository names: letters, digits, '-', '_', '.', at most 96 characters each part.
_HF_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_HF_REPO = re.compile(rf"^{_HF_PART}/{_HF_PART}$")
#: A branch, a tag, a 40-hex commit, or refs/pr/N.
_HF_REVISION = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._/-]{0,199}$")
_HF_FILE = re.compile(r"^[A-Za-z0-9._ +-][A-Za-z0-9._ +/-]{0,499}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_ID = re.compile(r"^[0-9]{1,12}$")
#: urn:air:{ecosystem}:{type}:{source}:{id}[@{version}][.{format}]
_AIR = re.compile(r"^urn:air:(?P<ecosystem>[a-z0-9_-]+):(?P<type>[a-z0-9_-]+):"
                  r"(?P<source>[a-z0-9_-]+):(?P<id>[^@]+?)(?:@(?P<version>[^.]+))?"
                  r"(?:\.(?P<format>[A-Za-z0-9]+))?$")
_PREFIXES = ("hf:", "civitai:", "urn:air:", "http://", "https://", "huggingface.co/",
             "hf.co/", "civitai.com/", "www.civitai.com/")


class ModelReferenceError(CgidmServiceError, ValueError):
    """A model reference that cannot be parsed; the message shows the accepted forms."""

    code, http_status = "invalid_model_reference", 422


@dataclass(frozen=True)
class ModelReference:
    """A parsed reference: a Hugging Face repo (revision and file optional) or a Civitai model
    version. ``given`` keeps the text as the user wrote it, for the record."""

    site: Site
    given: str
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    version_id: int | None = None
    model_id: int | None = None
    #: AIR's ecosystem (sd1, sdxl, flux1, ...): a hint at the base, when the reference had one.
    ecosystem: str | None = None

    @property
    def host(self) -> str:
        return SITE_HOSTS[self.site]

    @property
    def canonical(self) -> str:
        """The short form (``hf:o/n@rev:file``, ``civitai:N``) whatever form was given."""
        if self.site == "civitai":
            return f"civitai:{self.version_id}"
        text = f"hf:{self.repo_id}"
        if self.revision:
            text += f"@{self.revision}"
        if self.filename:
            text += f":{self.filename}"
        return text

    @property
    def pinned(self) -> bool:
        """Whether the reference names content that cannot change: a Civitai version (its file
        is checked against the published hash) or a Hugging Face commit hash."""
        return self.site == "civitai" or bool(self.revision and _COMMIT.match(self.revision))


def looks_like_reference(text: str) -> bool:
    """Whether ``text`` is meant as a hub reference (and so must parse as one), rather than a
    path or a registry id."""
    return text.strip().lower().startswith(_PREFIXES)


FORMS = ("hf:OWNER/NAME[@REVISION][:FILE], civitai:VERSION_ID, a huggingface.co or "
         "civitai.com model page URL (with ?modelVersionId=N for Civitai), or "
         "urn:air:ECOSYSTEM:TYPE:civitai:MODEL@VERSION")


def _bad(text: str, why: str) -> ModelReferenceError:
    return ModelReferenceError(f"{text[:200]!r} is not a model reference: {why}; write "
                               f"{FORMS}")


def _hf(given: str, repo_id: str, revision: str | None, filename: str | None,
        ecosystem: str | None = None) -> ModelReference:
    if not _HF_REPO.match(repo_id):
        raise _bad(given, f"{repo_id[:100]!r} is not a Hugging Face repository id (OWNER/NAME)")
    if revision is not None and (not _HF_REVISION.match(revision) or ".." in revision):
        raise _bad(given, f"{revision[:100]!r} is not a revision (a branch, tag or commit)")
    if filename is not None:
        parts = filename.split("/")
        if not _HF_FILE.match(filename) or any(p in ("", ".", "..") for p in parts):
            raise _bad(given, f"{filename[:100]!r} is not a file path inside the repository")
    return ModelReference("hf", given, repo_id=repo_id, revision=revision or None,
                          filename=filename or None, ecosystem=ecosystem)


def _civitai(given: str, version: str | None, model: str | None = None,
             ecosystem: str | None = None) -> ModelReference:
    if version is None:
        raise _bad(given, "a Civitai model has many versions and the reference names none "
                   "(open the version on the model page: its URL has ?modelVersionId=N)")
    if not _ID.match(version):
        raise _bad(given, f"the Civitai version id {version[:40]!r} is not a number")
    if model is not None and not _ID.match(model):
        raise _bad(given, f"the Civitai model id {model[:40]!r} is not a number")
    if int(version) == 0:
        raise _bad(given, "version id 0 does not exist")
    return ModelReference("civitai", given, version_id=int(version),
                          model_id=int(model) if model else None, ecosystem=ecosystem)


def _short_hf(given: str, body: str) -> ModelReference:
    repo, filename = body, None
    if ":" in body:
        repo, filename = body.split(":", 1)
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    return _hf(given, repo, revision, filename)


def _url(given: str, text: str) -> ModelReference:
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise _bad(given, f"unsupported URL scheme {parts.scheme!r}")
    host = (parts.hostname or "").lower()
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if host in _HF_HOSTS:
        if len(segments) >= 2 and segments[0] in ("datasets", "spaces"):
            raise _bad(given, "that is a dataset or Space, not a model repository")
        if len(segments) == 2:
            return _hf(given, "/".join(segments), None, None)
        if len(segments) >= 4 and segments[2] == "tree":
            return _hf(given, "/".join(segments[:2]), "/".join(segments[3:]), None)
        if len(segments) >= 5 and segments[2] in ("blob", "resolve"):
            return _hf(given, "/".join(segments[:2]), segments[3], "/".join(segments[4:]))
        raise _bad(given, "a Hugging Face URL must be a repository page, or a file's "
                   "/blob/REVISION/FILE or /resolve/REVISION/FILE URL")
    if host in _CIVITAI_HOSTS:
        query = parse_qs(parts.query)
        # parse_qs gives lists of str; [None] stands for a missing modelVersionId
        version: str | None = (query.get("modelVersionId") or [None])[0]  # type: ignore[list-item]
        if len(segments) >= 2 and segments[0] == "models":
            return _civitai(given, version, segments[1])
        if len(segments) == 4 and segments[:3] == ["api", "download", "models"]:
            return _civitai(given, segments[3])
        if len(segments) == 4 and segments[:3] == ["api", "v1", "model-versions"]:
            return _civitai(given, segments[3])
        raise _bad(given, "a Civitai URL must be a model page (/models/ID?modelVersionId=N) or "
                   "a download URL (/api/download/models/N)")
    raise _bad(given, f"models are fetched from huggingface.co or civitai.com, not {host!r}")


def _air(given: str, text: str) -> ModelReference:
    match = _AIR.match(text)
    if match is None:
        raise _bad(given, "not an AIR identifier (urn:air:ECOSYSTEM:TYPE:SOURCE:ID[@VERSION])")
    source, ident, version = match["source"], match["id"], match["version"]
    if source == "civitai":
        return _civitai(given, version, ident, ecosystem=match["ecosystem"])
    if source in ("huggingface", "hf"):
        return _hf(given, ident, version, None, ecosystem=match["ecosystem"])
    raise _bad(given, f"AIR source {source!r} is not supported (civitai, huggingface)")


def parse_reference(text: str) -> ModelReference:
    """The reference ``text`` names; :class:`ModelReferenceError` says what is wrong with it."""
    given = text
    text = text.strip()
    if not text or len(text) > 1000:
        raise _bad(given, "empty or longer than 1000 characters")
    if any(ord(c) < 32 or ord(c) == 127 or (c.isspace() and c != " ") for c in text):
        raise _bad(given, "it contains control characters")
    lower = text.lower()
    if lower.startswith("hf:"):
        return _short_hf(given, text[3:])
    if lower.startswith("civitai:"):
        body = text[len("civitai:"):]
        model, _, version = body.rpartition("@")  # civitai:MODEL@VERSION is accepted too
        return _civitai(given, version or None, model or None)
    if lower.startswith("urn:air:"):
        return _air(given, text)
    if lower.startswith(_PREFIXES):
        return _url(given, text)
    raise _bad(given, "it starts with none of hf:, civitai:, urn:air: or https://")
