"""The model registry: the only models the service will load, named by id.

Requests name models by registry id and never by path or URL, so a client cannot make the worker
open an arbitrary file or fetch remote code. The operator controls the registry file
(``CGIDM_MODELS``), a JSON document::

    {"models": [
      {"id": "sd15", "family": "stable-diffusion", "path": "/models/sd15"},
      {"id": "sd15-vangogh", "family": "stable-diffusion", "path": "/models/vangogh",
       "finetuned_from": "sd15", "kind": "dreambooth", "prompt": "sks style"}
    ]}

Relative paths are resolved against the registry file's folder. A suspect named by a hub
reference (``cgidm.model_refs``) brings the name of its base (Civitai's ``baseModel``, a Hugging
Face model card's ``base_model``); :data:`BASE_MODEL_NAMES` maps those names to registry ids, and
the file's optional ``"base_models": {"<name>": "<registry id>"}`` adds or overrides entries.
Without a file the registry holds the demo models that ship with the package (their ``path``
is the demo name, which ``cgidm_core.load_pair`` resolves to the packaged folders), read from
the torch-free ``cgidm_core.names``.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cgidm.errors import CgidmServiceError
from cgidm_core import families
from cgidm_core.names import DEMO_BASES, DEMO_FAMILIES, DEMO_MODELS

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(CgidmServiceError):
    """The registry file is missing or malformed: an operator error, reported at start-up."""

    code = "registry_error"


class InvalidModelReference(CgidmServiceError, ValueError):
    """A request named a model by something other than a plain registry id."""

    code, http_status = "invalid_model_reference", 422


class UnknownModel(CgidmServiceError, LookupError):
    """A request named a registry id that does not exist."""

    code, http_status = "unknown_model", 422


class ModelEntry(BaseModel):
    """One registered model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_ID.pattern, examples=["demo-vangogh"])
    family: str = Field(examples=["ddpm", "stable-diffusion"])
    path: str = Field(description="Folder or file of the weights (operator-side; not published).")
    finetuned_from: str | None = Field(None, description="Registry id of the base model.")
    kind: str | None = Field(
        None, description="How the fine-tune is stored (dreambooth, lora, single-file...)."
    )
    prompt: str | None = Field(None, description="Instance prompt used when a job gives none.")
    description: str | None = None

    @field_validator("family")
    @classmethod
    def _registered_family(cls, family: str) -> str:
        """A family the registry (``cgidm models --families``) knows: a typo would otherwise
        surface only as a refused upload or a failed job."""
        if families.find(family) is None:
            known = ", ".join(f.name for f in families.FAMILIES)
            raise ValueError(f"unknown model family {family!r}; the registered ones are {known}")
        return family


#: Base-model names as the hubs record them -> the registry id a deployment conventionally gives
#: that base. Civitai's ``baseModel`` values (model-version API) and the Hugging Face repositories
#: model cards name as ``base_model``. Matched case-insensitively; a name whose id is not in the
#: registry is reported, not guessed. Operators extend or override it in the registry file.
BASE_MODEL_NAMES: dict[str, str] = {
    "SD 1.4": "sd14", "SD 1.5": "sd15", "SD 1.5 LCM": "sd15", "SD 1.5 Hyper": "sd15",
    "SD 2.0": "sd20", "SD 2.0 768": "sd20-768", "SD 2.1": "sd21", "SD 2.1 768": "sd21-768",
    "SDXL 1.0": "sdxl", "SDXL 0.9": "sdxl", "SDXL Lightning": "sdxl", "SDXL Hyper": "sdxl",
    "SDXL Turbo": "sdxl-turbo", "Pony": "pony", "Illustrious": "illustrious",
    "NoobAI": "noobai", "SD 3": "sd3-medium", "SD 3.5": "sd35-large",
    "SD 3.5 Medium": "sd35-medium", "SD 3.5 Large": "sd35-large", "Flux.1 D": "flux1-dev",
    "Flux.1 S": "flux1-schnell",
    "CompVis/stable-diffusion-v1-4": "sd14",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1-base": "sd21", "stabilityai/stable-diffusion-2-1": "sd21-768",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "black-forest-labs/FLUX.1-dev": "flux1-dev",
    "black-forest-labs/FLUX.1-schnell": "flux1-schnell",
}


class PublicModel(BaseModel):
    """What ``GET /models`` shows of an entry: everything but the operator's file path."""

    id: str
    family: str
    finetuned_from: str | None = None
    kind: str | None = None
    prompt: str | None = None
    description: str | None = None


#: The demo models that ship with the package, from the library's torch-free table.
DEMO_ENTRIES = tuple(
    ModelEntry(id=name, family=DEMO_FAMILIES[name], path=name, finetuned_from=DEMO_BASES[name],
               description=description)
    for name, description in DEMO_MODELS.items()
)


def check_reference(ref: str) -> str:
    """Refuse anything that looks like a path or URL before looking the id up."""
    if (
        "/" in ref
        or "\\" in ref
        or ".." in ref
        or ":" in ref
        or ref.startswith(("~", "."))
        or not _ID.match(ref)
    ):
        raise InvalidModelReference(
            f"{ref!r} is not a model id: models are referenced by their registry id "
            "(see GET /models), never by a path or URL"
        )
    return ref


class Registry:
    """The entries of one registry file, by id."""

    def __init__(self, entries: list[ModelEntry] | tuple[ModelEntry, ...], source: str,
                 base_models: dict[str, str] | None = None):
        self.source = source
        self.base_models = {k.lower(): v for k, v in
                            {**BASE_MODEL_NAMES, **(base_models or {})}.items()}
        self.entries: dict[str, ModelEntry] = {}
        for entry in entries:
            if entry.id in self.entries:
                raise RegistryError(f"{source}: model id {entry.id!r} appears twice")
            self.entries[entry.id] = entry
        for entry in self.entries.values():
            if entry.finetuned_from is not None and entry.finetuned_from not in self.entries:
                raise RegistryError(
                    f"{source}: {entry.id!r} is fine-tuned from {entry.finetuned_from!r}, "
                    "which is not in the registry"
                )

    def get(self, ref: str) -> ModelEntry:
        check_reference(ref)
        try:
            return self.entries[ref]
        except KeyError:
            known = ", ".join(sorted(self.entries)) or "none"
            raise UnknownModel(f"unknown model id {ref!r}; registered ids: {known}") from None

    def check_pair(self, pretrained: str, finetuned: str) -> tuple[ModelEntry, ModelEntry]:
        """Both entries, refusing a fine-tune compared against a base it was not made from."""
        base, tuned = self.get(pretrained), self.get(finetuned)
        if tuned.finetuned_from is not None and tuned.finetuned_from != base.id:
            raise UnknownModel(
                f"{tuned.id!r} was fine-tuned from {tuned.finetuned_from!r}, not {base.id!r}; "
                "compare a fine-tune with its own base model"
            )
        return base, tuned

    def base_for(self, name: str | None) -> ModelEntry:
        """The registered base a hub calls ``name`` (``SD 1.5``, ``org/stable-diffusion-v1-5``).

        :class:`UnknownModel` when the name is not in the table or its id is not registered: the
        message says how to name the base instead."""
        if not name:
            raise UnknownModel("the suspect does not record its base model; name the base "
                               "(--pretrained, or the pretrained field)")
        ref = self.base_models.get(name.strip().lower())
        if ref is None:
            raise UnknownModel(f"the suspect's base model {name!r} maps to no registered base; "
                               "name the base (--pretrained), or add it to the registry file's "
                               f'"base_models": {{"{name}": "<registry id>"}}')
        if ref not in self.entries:
            raise UnknownModel(f"the suspect's base model {name!r} is {ref!r}, which is not in "
                               f"the registry ({self.source}); register it or name the base "
                               "(--pretrained)")
        return self.entries[ref]

    def public(self) -> list[PublicModel]:
        return [
            PublicModel(**entry.model_dump(exclude={"path"})) for entry in self.entries.values()
        ]


def _load_file(path: Path) -> Registry:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"model registry {path} does not exist (CGIDM_MODELS)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"model registry {path} cannot be read: {exc}") from exc
    items = document.get("models") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise RegistryError(f"model registry {path} must hold {{\"models\": [...]}}")
    base_models = document.get("base_models") if isinstance(document, dict) else None
    if base_models is not None and not (isinstance(base_models, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in base_models.items())):
        raise RegistryError(f"model registry {path}: \"base_models\" must map hub base-model "
                            "names to registry ids")
    entries = []
    for i, item in enumerate(items):
        try:
            entry = ModelEntry.model_validate(item)
        except ValidationError as exc:
            raise RegistryError(f"model registry {path}, entry {i}: {exc}") from exc
        model_path = Path(entry.path).expanduser()
        if not model_path.is_absolute() and (path.parent / model_path).exists():
            entry = entry.model_copy(update={"path": str((path.parent / model_path).resolve())})
        entries.append(entry)
    return Registry(entries, str(path), base_models)


@lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int) -> Registry:
    return _load_file(Path(path))


def load_registry(path: Path | str | None) -> Registry:
    """The registry in ``path`` (re-read when the file changes), or the demo pair."""
    if path is None:
        return Registry(DEMO_ENTRIES, "built-in demo registry")
    resolved = Path(path).expanduser().resolve()
    try:
        mtime = resolved.stat().st_mtime_ns
    except OSError:
        raise RegistryError(f"model registry {resolved} does not exist (CGIDM_MODELS)") from None
    return _cached(str(resolved), mtime)
