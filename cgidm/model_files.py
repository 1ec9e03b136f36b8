"""Checking an uploaded model file without torch: the safetensors header and its tensor names.

The gateway validates a suspect model while it streams in, and it never imports torch, so this
module reads the safetensors format itself (it is simple and documented: an 8-byte little-endian
header length, a JSON header, then the raw tensor bytes):

- the header length must be sane (at least ``{}``, at most :data:`MAX_HEADER_BYTES`);
- every tensor entry must name a known dtype, a shape of non-negative integers and
  ``data_offsets`` that match ``prod(shape) * itemsize``; the entries must tile the data area
  exactly (no gap, no overlap), and the file must end where the last tensor ends;
- the tensor NAMES say what the file holds (:func:`classify`): a LoRA (diffusers, peft or kohya
  naming), a single-file checkpoint (the LDM layout, or a diffusion transformer's) or the
  weights of a fine-tuned UNet in diffusers naming, and which registered families
  (:mod:`cgidm_core.families`) such names belong to (their key signatures); a file of another
  family than the base's (``family_mismatch``), a family or layout that takes no uploads (its
  entry's ``upload_kinds``: ``cgidm models --families``) and pickle files are refused with a
  message that says why.

The name rules themselves live in the library (:mod:`cgidm_core.key_signatures`, torch-free), which
``cgidm_core.models.formats`` also reads to detect the same kinds on disk: the library stands
alone and the gateway borrows its vocabulary, never the other way round.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from cgidm.errors import CodedError
from cgidm_core import families
from cgidm_core.family_evidence import weigh
from cgidm_core.key_signatures import (  # noqa: F401 - re-exported: the gateway's name rules
    is_conditional_unet,
    is_flux_lora,
    is_sdxl_lora,
    is_sdxl_single_file,
    looks_like_diffusers_unet,
    looks_like_lora,
    looks_like_single_file,
    looks_like_transformer,
    transformer_family,
)
from cgidm_core.names import PICKLE_SUFFIXES as PICKLE_SUFFIXES  # the upload check's refusal

#: safetensors refuses headers above 100 MB; real checkpoints have a few hundred KB of header.
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: A safetensors header nests three deep at most: the top object, a tensor's object, its shape
#: or data_offsets list (``__metadata__`` maps strings to strings). Python's decoder recurses
#: once per level, so 10,001 nested arrays ended in a RecursionError (a 500) instead of a
#: refusal; see parse_header for how deeper JSON is refused now.
MAX_HEADER_NESTING = 3
#: bytes per element of every dtype safetensors defines.
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
#: What an upload may be: LoRA weights, a single-file checkpoint (LDM UNet or diffusion
#: transformer), or fine-tuned UNet weights.
UPLOAD_KINDS = ("lora", "single_file", "unet")
PICKLE_REFUSAL = (
    "pickle checkpoints (.ckpt, .bin, .pt) can run code when they are opened, so cgidm accepts "
    "only .safetensors files; convert the model once in a trusted environment (e.g. "
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')`)"
)


class ModelFileError(CodedError, ValueError):
    """The file is not an acceptable model: ``code`` says why in one word, the message how to
    fix it. The gateway answers it with 422 (415 for ``pickle_checkpoint``); a worker fails the
    job with its code."""

    http_status = 422


@dataclass
class SafetensorsHeader:
    """The parsed header of a safetensors file."""

    header_bytes: int
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return max((t["data_offsets"][1] for t in self.tensors.values()), default=0)

    @property
    def file_bytes(self) -> int:
        """The exact size a file with this header must have."""
        return 8 + self.header_bytes + self.data_bytes

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def dtypes(self) -> dict[str, int]:
        """How many tensors of each dtype (for the model's description)."""
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + 1
        return counts


def looks_like_pickle(first_bytes: bytes) -> bool:
    """A torch checkpoint: a zip archive (torch >= 1.6) or a raw pickle stream."""
    return first_bytes.startswith(b"PK\x03\x04") or (
        len(first_bytes) >= 2 and first_bytes[0] == 0x80 and 2 <= first_bytes[1] <= 5)


def header_length(prefix: bytes) -> int:
    """The header length from a file's first 8 bytes, refusing impossible values."""
    if looks_like_pickle(prefix):
        raise ModelFileError("pickle_checkpoint", "this is a pickle checkpoint, not a "
                             "safetensors file: " + PICKLE_REFUSAL)
    (length,) = struct.unpack("<Q", prefix[:8])
    if length < 2 or length > MAX_HEADER_BYTES:
        raise ModelFileError("corrupt_safetensors", f"the safetensors header length is {length} "
                             f"bytes (must be 2..{MAX_HEADER_BYTES}); the file is not a "
                             "safetensors file or is corrupt")
    return length


_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_ONE_KIND = bytes.maketrans(b"{}", b"[]")
#: Python's JSON decoder recurses once per nesting level and raises RecursionError at the
#: interpreter's recursion limit (1,000 by default), which parse_header turns into a refusal.
#: Should anything in the process raise the limit past this, a deep header could exhaust the C
#: stack instead, so the exact scan below runs first.
SAFE_RECURSION_LIMIT = 10_000


def nests_deeper_than(raw: bytes, levels: int) -> bool:
    """Whether the JSON text ``raw`` has brackets nested deeper than ``levels`` (or brackets
    that do not balance), found without decoding it, in time linear in its size.

    Escapes go first (so a string holds no backslash pair and no escaped quote), then the
    strings (every other piece between quotes: brackets inside them do not count), then all but
    the brackets, with ``{}`` written as ``[]``; each pass that deletes every adjacent ``[]``
    lowers every nesting by exactly one level (replacement does not rescan what it joins), so
    ``levels`` passes leave nothing exactly when the brackets balance within that depth."""
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(text.split(b'"')[0::2])
    brackets = outside.translate(_ONE_KIND, _NOT_BRACKETS)
    for _ in range(levels):
        brackets = brackets.replace(b"[]", b"")
        if not brackets:
            return False
    return bool(brackets)


def parse_header(raw: bytes) -> SafetensorsHeader:
    """Validate a header (the JSON after the 8 length bytes) as far as it can be without the
    file's size; :meth:`SafetensorsHeader.file_bytes` is the size the file must then have.

    Raises only :class:`ModelFileError` (code ``corrupt_safetensors``), whatever the bytes:
    the gateway turns it into a 422, and ``tests/test_model_file_fuzz.py`` holds it to that."""

    def bad(message: str) -> ModelFileError:
        return ModelFileError("corrupt_safetensors", f"invalid safetensors header: {message}")

    too_deep = bad(f"its JSON nests deeper than {MAX_HEADER_NESTING} levels or its brackets do "
                   "not balance (a safetensors header is an object of tensor entries, each with "
                   "a shape and data_offsets list)")
    # The exact scan costs seconds on a hostile 64 MiB header; the decoder refuses most such
    # headers at their first bytes and bounds the nesting itself (RecursionError), so the scan
    # runs only where that bound is not safe. Deeper-than-3 JSON that decodes is refused by the
    # structure checks below: nothing in a valid header nests deeper.
    if sys.getrecursionlimit() > SAFE_RECURSION_LIMIT and \
            nests_deeper_than(raw, MAX_HEADER_NESTING):
        raise too_deep
    try:
        document = json.loads(raw.decode("utf-8"))
        # a lone surrogate (``"\\ud800"``) decodes but cannot be stored or answered as UTF-8
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise too_deep from None
    except (UnicodeError, ValueError) as exc:
        # ValueError: JSONDecodeError, and an integer literal past Python's digit limit
        raise bad(f"not JSON ({str(exc)[:200]})") from None
    if not isinstance(document, dict):
        raise bad("not a JSON object")
    metadata = document.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    if not document:
        raise bad("the file holds no tensors")
    spans: list[tuple[int, int, str]] = []
    for name, info in document.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name[:80]!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise bad(f"tensor {name[:80]!r} has unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad(f"tensor {name[:80]!r} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise bad(f"tensor {name[:80]!r} has invalid data_offsets")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise bad(f"tensor {name[:80]!r}: data_offsets span {end - begin} bytes but "
                      f"{dtype}{shape} needs {math.prod(shape) * DTYPE_BYTES[dtype]}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"tensor {name[:80]!r} starts at {begin}, expected {position} (tensors "
                      "must tile the data without gaps or overlaps)")
        position = end
    return SafetensorsHeader(len(raw), document, metadata)


def read_header(path: str) -> SafetensorsHeader:
    """Validate a safetensors file on disk, its size included."""
    import os

    with open(path, "rb") as handle:
        length = header_length(handle.read(8))
        header = parse_header(handle.read(length))
    check_size(header, os.path.getsize(path))
    return header


def check_size(header: SafetensorsHeader, size: int) -> None:
    if size != header.file_bytes:
        raise ModelFileError("corrupt_safetensors", f"the file has {size} bytes but its header "
                             f"describes {header.file_bytes}; it is truncated or corrupt")


# ------------------------------------------------------------------------------------------
# what the tensor names say


def _upload_layout(keys: list[str]) -> str:
    """``lora``, ``single_file`` or ``unet`` from the tensor names (the registry's rules)."""
    if looks_like_lora(keys):
        return "lora"
    refused = families.refused_file(keys)
    if refused is not None:
        raise ModelFileError("unsupported_family", f"this is a {refused.title} model: "
                             f"{refused.message}")
    if families.file_claims(keys, "single_file"):
        return "single_file"
    if looks_like_transformer(keys):
        raise ModelFileError("unsupported_family", "this holds a diffusion transformer of no "
                             "registered family (see `cgidm models --families`)")
    if families.file_claims(keys, "unet"):
        return "unet"
    raise ModelFileError("unknown_model_file", "the tensor names are neither a LoRA, nor a "
                         "single-file checkpoint (model.diffusion_model.*), nor a diffusers "
                         "UNet (conv_in, down_blocks, time_embedding)")


def classify(keys: list[str], family: str, kind: str | None = None,
             metadata: dict[str, str] | None = None) -> str:
    """The upload kind (:data:`UPLOAD_KINDS`) of a file with these tensor names, for a base of
    ``family``; ``kind`` is what the client said, checked against the names.

    Which families the names can belong to, and which layouts each family takes as uploads
    (``Family.upload_kinds``), is the family registry's (:mod:`cgidm_core.families`). A LoRA
    whose header ``metadata`` names only other families' bases is refused ``family_mismatch``
    though its names fit (:mod:`cgidm_core.family_evidence`: a Flux.2 Klein LoRA of attention
    layers is named as a Chroma one)."""
    if kind is not None and kind not in UPLOAD_KINDS:
        raise ModelFileError("unknown_kind", f"kind {kind!r} is not one of "
                             f"{', '.join(UPLOAD_KINDS)} (leave it out to detect it)")
    found = _upload_layout(keys)
    claims = families.file_claims(keys, found)
    taking = families.families_taking_uploads()
    if claims and not any(claim.upload_kinds for claim in claims):
        names = " or ".join(claim.title for claim in claims)
        raise ModelFileError("unsupported_family", f"the tensor names say {names} ({found}); "
                             "the service takes uploads for "
                             f"{' and '.join(f.title for f in taking)} bases; check it locally "
                             "with `cgidm check --pretrained <its base>`")
    if kind is not None and kind != found:
        raise ModelFileError("kind_mismatch", f"kind is {kind!r} but the file holds {found} "
                             "weights (leave kind out to detect it)")
    base = families.find(family)
    if base is None or not base.upload_kinds:
        raise ModelFileError("unsupported_family", f"uploads for {family!r} bases are not "
                             "supported")
    if base not in claims:
        names = " or ".join(claim.title for claim in claims) or "another family"
        raise ModelFileError("family_mismatch", f"the base is {base.title}, but the tensor names "
                             f"say {names} ({found.replace('_', '-')}); upload a "
                             f"{'/'.join(base.upload_kinds)} fine-tune of a {base.title} base, "
                             "or pick a base of the file's family")
    if found == "lora" and metadata:
        evidence = weigh(keys, metadata, base.name)
        if evidence.trained_for:
            raise ModelFileError("family_mismatch", evidence.mismatch_message("this LoRA"))
    if found not in base.upload_kinds:
        raise ModelFileError("unsupported_upload_kind", f"this is a {base.title} "
                             f"{found.replace('_', '-')}, which the service does not load for "
                             f"{base.title} bases (it takes {'/'.join(base.upload_kinds)} "
                             "uploads; `cgidm models --families` lists what each family loads)")
    return found


def prompt_from_metadata(metadata: dict[str, str]) -> str | None:
    """An instance prompt some trainers store in the file's ``__metadata__``."""
    for key in ("cgidm_prompt", "instance_prompt", "ss_instance_prompt", "prompt"):
        value = metadata.get(key)
        if value and value.strip():
            return value.strip()[:1000]
    return None
