"""Which prompt a check conditions on, and where it came from.

A DreamBooth or LoRA concept is tied to its trigger words: conditioning both models on the empty
prompt silently weakens the contrast on exactly the models people bring. The prompt used is, in
order: the one the caller gave; the registry entry's (service only); the fine-tune's own
metadata (kohya's ``ss_tag_frequency`` / ``ss_output_name`` in a safetensors header, then
``instance_prompt`` or trigger words in a ``README.md`` model card next to the fine-tune); else
the empty prompt, with a warning that every report repeats.

This module reads only JSON headers and text files (no torch), so the CLI and the worker can call
it before or after loading models.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # annotations only: the pair module imports torch
    from .pair import ModelPair

#: Where a prompt came from, in order of precedence.
PROMPT_SOURCES = (
    "given",  # --prompt, the API field, the Python argument
    "registry",  # the registry entry of the fine-tune (service)
    "safetensors_metadata",  # kohya ss_tag_frequency / ss_output_name in the weights' header
    "model_card",  # instance_prompt / trigger words in README.md next to the fine-tune
    "empty",  # nothing found: the empty prompt, with a warning
    "unconditional",  # the models take no text (pixel DDPM): no prompt at all
)
EMPTY_PROMPT_WARNING = (
    "no prompt was given and none was found in the registry or the fine-tune's metadata "
    "(kohya ss_tag_frequency/ss_output_name, README.md instance_prompt or trigger words): both "
    "models are conditioned on the empty prompt, which weakens the evidence for a DreamBooth or "
    "LoRA fine-tune tied to trigger words; give the fine-tune's instance prompt (--prompt, or "
    "the API's prompt field)"
)
#: Most trigger words taken from a tag-frequency table.
MAX_TRIGGER_TAGS = 3
_KOHYA_DIR = re.compile(r"^\d+_(.+)$")
_MODEL_CARD_PATTERNS = (
    re.compile(r"^instance_prompt:\s*(.+?)\s*$", re.MULTILINE),
    re.compile(r"use\s+`([^`\n]+)`\s+to\s+trigger", re.IGNORECASE),
    re.compile(r"trigger\s+words?\s*(?:are|is)?\s*[:：]\s*`?([^`\n]+?)`?\s*$",
               re.IGNORECASE | re.MULTILINE),
    re.compile(r"trigger\s+words?\s*\n+\s*(?:you should use\s+)?`([^`\n]+)`", re.IGNORECASE),
)


class EmptyPromptWarning(UserWarning):
    """A conditional pair is checked with the empty prompt (see :data:`EMPTY_PROMPT_WARNING`)."""


@dataclass(frozen=True)
class PromptChoice:
    """The prompt a check runs with; ``text`` is ``None`` for unconditional models."""

    text: str | None
    source: str
    #: Where it was found (a file and a key), for the report.
    origin: str | None = None

    @property
    def warning(self) -> str | None:
        return EMPTY_PROMPT_WARNING if self.source == "empty" else None

    def to_settings(self) -> dict[str, Any]:
        """Keys for ``results.json`` settings and the API result (added next to the others)."""
        out: dict[str, Any] = {"prompt": self.text, "prompt_source": self.source}
        if self.origin:
            out["prompt_origin"] = self.origin
        if self.warning:
            out["prompt_warning"] = self.warning
        return out


def choose_prompt(
    given: str | None, pair: ModelPair, *, registry_prompt: str | None = None
) -> PromptChoice:
    """The prompt for a check of ``pair``, following the order in the module docstring.

    The fine-tune's metadata was read when the pair was loaded (``pair.default_prompt`` and
    ``pair.default_prompt_source``); a pair built in memory has none.
    """
    if not getattr(pair, "conditional", True):
        return PromptChoice(None, "unconditional")
    if given is not None:
        return PromptChoice(given, "given")
    if registry_prompt is not None:
        return PromptChoice(registry_prompt, "registry")
    default = getattr(pair, "default_prompt", None)
    if default is not None:
        source = getattr(pair, "default_prompt_source", None) or "given"
        return PromptChoice(default, source, getattr(pair, "default_prompt_origin", None))
    return PromptChoice("", "empty")


# -- the fine-tune's own metadata --------------------------------------------------------------


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (read as JSON, no tensors), or ``{}``."""
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 100_000_000:
                return {}
            header = json.loads(handle.read(size))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def prompt_from_kohya_metadata(metadata: dict[str, str]) -> tuple[str, str] | None:
    """``(prompt, key)`` from kohya-ss training metadata, or ``None``.

    ``ss_tag_frequency`` maps each dataset folder to the caption tags' counts: the tags found in
    the most captions are the trigger words (a trigger is in every caption); without captions,
    kohya's ``<repeats>_<words>`` folder name carries the instance words. ``ss_output_name``, the
    name the trainer gave the LoRA, comes last.
    """
    raw = metadata.get("ss_tag_frequency")
    if raw:
        try:
            table = json.loads(raw)
        except json.JSONDecodeError:
            table = None
        if isinstance(table, dict):
            counts: Counter[str] = Counter()
            for tags in table.values():
                if isinstance(tags, dict):
                    for tag, count in tags.items():
                        if isinstance(count, int | float) and str(tag).strip():
                            counts[str(tag).strip()] += int(count)
            if counts:
                top = max(counts.values())
                trigger = [tag for tag, count in counts.items() if count == top]
                return ", ".join(trigger[:MAX_TRIGGER_TAGS]), "ss_tag_frequency"
            for folder in table:
                match = _KOHYA_DIR.match(str(folder).strip())
                if match and match.group(1).strip():
                    return match.group(1).strip(), "ss_tag_frequency (dataset folder)"
    name = metadata.get("ss_output_name", "").strip()
    if name:
        return name, "ss_output_name"
    return None


def prompt_from_model_card(text: str) -> str | None:
    """``instance_prompt`` from a model card's front matter, or its stated trigger words."""
    for pattern in _MODEL_CARD_PATTERNS:
        match = pattern.search(text)
        if match:
            prompt = match.group(1).strip().strip("\"'`").strip()
            if prompt and prompt.lower() not in ("null", "none"):
                return prompt
    return None


def finetune_prompt(path: str | Path, weights: Path | None = None) -> tuple[str, str, str] | None:
    """``(prompt, source, origin)`` from a fine-tune's own files, or ``None``.

    ``weights`` is the safetensors file whose header to read (a LoRA or a single file; by
    default ``path`` itself when it is a file); the model card is ``README.md`` in the fine-tune's
    folder (the file's folder for a file).
    """
    path = Path(path)
    file = weights if weights is not None else (path if path.is_file() else None)
    if file is not None and file.suffix == ".safetensors":
        found = prompt_from_kohya_metadata(safetensors_metadata(file))
        if found is not None:
            return found[0], "safetensors_metadata", f"{file.name}: {found[1]}"
    card = (path.parent if path.is_file() else path) / "README.md"
    if card.is_file():
        try:
            text = card.read_text(encoding="utf-8", errors="replace")[:200_000]
        except OSError:
            return None
        prompt = prompt_from_model_card(text)
        if prompt is not None:
            return prompt, "model_card", str(card.name)
    return None


class PromptTooLong(ConfigError):
    """The prompt has more tokens than the model's text encoder takes."""

    code = "prompt_too_long"


def check_prompt_length(pair: ModelPair, prompt: str | None) -> None:
    """Refuse a prompt the text encoder would silently cut: evidence computed on a truncated
    prompt would not be about the prompt the user gave.

    It asks the pair's own tokenizers (a Stable Diffusion adapter's ``tokenizer`` and, when the
    fine-tune brought its own, ``tokenizer_finetuned``); models without one (pixel DDPMs) ignore
    prompts and pass.
    """
    if not prompt:
        return
    seen: set[int] = set()
    for tokenizer in (getattr(pair, "tokenizer", None), getattr(pair, "tokenizer_finetuned", None)):
        if tokenizer is None or id(tokenizer) in seen:
            continue
        seen.add(id(tokenizer))
        count = len(tokenizer(prompt, truncation=False)["input_ids"])
        limit = int(tokenizer.model_max_length)
        if count > limit:
            raise PromptTooLong(
                f"the prompt is {count} tokens long but the model's text encoder takes at most "
                f"{limit} (start and end markers included); shorten it")
