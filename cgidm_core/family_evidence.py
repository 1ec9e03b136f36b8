"""Which family a LoRA file was trained for, weighing its header's trainer metadata against
its tensor names, and how sure that is.

Tensor names alone cannot always tell: a Flux.2 Klein LoRA of its double blocks' attention
(``transformer_blocks.N.attn.to_q`` ...) is named exactly as a Chroma (or Flux.1, SD 3.x,
Qwen-Image) one, and at full size Klein 4B and Chroma are both 3072 wide, so diffusers / peft
attach it to the wrong base without an error and the verdict is computed on a wrong model.
Trainers usually record the base in the safetensors header (ai-toolkit:
``ss_base_model_version = "flux2_klein_4b"``; kohya-ss sd-scripts and musubi-tuner:
``modelspec.architecture = "chroma/lora"``, ``"Flux.2-klein-4b/lora"``; sd-scripts:
``ss_sd_model_name``, the base's file name); diffusers' ``save_lora_weights`` writes none. So:

- the header names the base's family (in any of :data:`METADATA_KEYS`): taken, ``source``
  ``"metadata"``;
- the header names families, none of them the base's: refused (:attr:`FamilyEvidence.
  trained_for` is set; the caller raises its own error with :meth:`FamilyEvidence.
  mismatch_message`);
- the header names none: the tensor names decide as before (``"tensor_names"`` when the base's
  family is the only registered one they fit; ``"base"``, ``ambiguous``, when several fit and
  the file was taken for the base's family only because the base is of it).

Each family's patterns are its registry entry's ``Recognition.trained_for``. Torch-free (the
gateway reads it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from cgidm_core import families

#: Header keys whose values name the base a file was trained on, most specific first.
METADATA_KEYS: tuple[str, ...] = ("modelspec.architecture", "ss_base_model_version",
                                  "ss_base_model", "base_model", "ss_sd_model_name")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def _normalised(value: str) -> str:
    return _NOT_ALNUM.sub("", value.lower())


def metadata_claims(metadata: dict[str, str]) -> dict[str, list[str]]:
    """The registered families the header's :data:`METADATA_KEYS` name, each with the
    ``key='value'`` entries that name it (several families when entries disagree, e.g. a Chroma
    LoRA whose ``ss_base_model_version`` says ``flux1`` and ``modelspec.architecture``
    ``chroma/lora``)."""
    out: dict[str, list[str]] = {}
    for key in METADATA_KEYS:
        value = metadata.get(key)
        if not value or not value.strip():
            continue
        text = _normalised(value)
        for family in families.FAMILIES:
            if any(re.search(p, text) for p in family.recognition.trained_for):
                out.setdefault(family.name, []).append(f"{key}={value[:80]!r}")
    return out


@dataclass(frozen=True)
class FamilyEvidence:
    """What says a fine-tune file is of the base's family (recorded in the pair's
    ``describe()``, hence in results.json)."""

    #: The base's family, which the file is taken for unless :attr:`trained_for` is set.
    family: str
    #: ``"metadata"``, ``"tensor_names"`` or ``"base"`` (the names fit several families and
    #: nothing else says which: inferred from the base).
    source: str
    ambiguous: bool
    #: Registered families whose name rules claim the file.
    name_claims: tuple[str, ...] = ()
    #: The header entries that named a family, ``key='value'``.
    metadata: tuple[str, ...] = ()
    #: Families the header names when none of them is the base's: the file is of another base.
    trained_for: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "source": self.source, "ambiguous": self.ambiguous,
                "name_claims": list(self.name_claims), "metadata": list(self.metadata)}

    def mismatch_message(self, what: str) -> str:
        """Why ``what`` (a file) is refused for the base, and what to do instead."""
        trained = " or ".join(families.title(name) for name in self.trained_for)
        base = families.title(self.family)
        return (f"{what} was trained for {trained} (its header says "
                f"{', '.join(self.metadata)}), but the base is {base}; its tensor names fit "
                f"{base} too, but a verdict against a {base} base would be computed on the "
                f"wrong model: check it against the {trained} base it was trained on")


def weigh(keys: list[str], metadata: dict[str, str], base_family: str,
          kind: str = "lora") -> FamilyEvidence:
    """The evidence that a fine-tune file with these tensor names and header ``metadata``
    (layout ``kind``) is of ``base_family``; :attr:`FamilyEvidence.trained_for` is set when the
    header names only other families."""
    claims = tuple(f.name for f in families.file_claims(keys, kind))
    named = metadata_claims(metadata)
    entries = tuple(entry for found in named.values() for entry in found)
    if named and base_family not in named:
        return FamilyEvidence(base_family, "metadata", False, claims, entries,
                              trained_for=tuple(named))
    if named:
        return FamilyEvidence(base_family, "metadata", False, claims,
                              tuple(named[base_family]))
    if claims == (base_family,):
        return FamilyEvidence(base_family, "tensor_names", False, claims)
    return FamilyEvidence(base_family, "base", True, claims)
