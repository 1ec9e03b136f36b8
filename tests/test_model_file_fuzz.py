"""The gateway's safetensors header parser against hostile and random headers.

Every header, however malformed, must end in a parsed header or a ``ModelFileError`` (which the
gateway answers as a 4xx), never in another exception (which it would answer as a 500). The
case that started this: a header of 10,001 nested JSON arrays made Python's JSON decoder raise
RecursionError. Hypothesis generates random bytes, random JSON documents of any depth and
near-valid headers with one part broken; the seed is fixed (``derandomize``) so a run is
repeatable.
"""

from __future__ import annotations

import contextlib
import json
import struct
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgidm.model_files import (
    MAX_HEADER_NESTING,
    SAFE_RECURSION_LIMIT,
    ModelFileError,
    SafetensorsHeader,
    classify,
    header_length,
    nests_deeper_than,
    parse_header,
)

FUZZ = settings(derandomize=True, max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def outcome(raw: bytes) -> SafetensorsHeader | ModelFileError:
    """What parse_header makes of ``raw``: a header or a ModelFileError; anything else fails."""
    try:
        return parse_header(raw)
    except ModelFileError as exc:
        assert exc.code == "corrupt_safetensors"
        assert str(exc).startswith("invalid safetensors header")
        return exc


@pytest.mark.parametrize("raw", [
    b"[" * 10_001 + b"]" * 10_001,
    b'{"a":' * 10_001 + b"1" + b"}" * 10_001,
    b"[" * 10_001,                                   # never closed
    b'{"a": {"dtype": "F32", "shape": ' + b"[" * 5000 + b"]" * 5000 + b', "data_offsets": [0, 0]}}',
    b'{"__metadata__": {"k": ' + b"[" * 3000 + b"]" * 3000 + b"}}",
])
def test_deeply_nested_headers_are_refused_not_crashed(raw):
    with pytest.raises(ModelFileError, match="nests deeper than 3"):
        parse_header(raw)


@pytest.mark.parametrize("raw", [b"[" * 10_001 + b"]" * 10_001, b"[" * 50_001, b"{}}"])
def test_with_a_raised_recursion_limit_the_exact_scan_refuses_first(raw):
    """Something in the process raised the recursion limit: the decoder would no longer stop
    deep input in time, so the scan refuses it before decoding."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(SAFE_RECURSION_LIMIT + 1)
    try:
        with pytest.raises(ModelFileError, match="nests deeper than 3"):
            parse_header(raw)
    finally:
        sys.setrecursionlimit(before)


def test_brackets_inside_strings_do_not_count():
    name = "a[[[[[{{{{\\\"]]]]"  # an escaped quote too: the string must not end early
    raw = json.dumps({name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                      "__metadata__": {"prompt": "[[[[[[[[ {{{{{ \\"}}).encode()
    assert not nests_deeper_than(raw, MAX_HEADER_NESTING)
    assert parse_header(raw).names == [name]


@pytest.mark.parametrize("raw, words", [
    (b'{"a": 1' + b"1" * 5000 + b"}", "not JSON"),   # past Python's int-digit limit: ValueError
    (b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "not JSON"),
    (b"\xff\xfe{}", "not JSON"),
    (b"[]", "not a JSON object"),
    (b"5", "not a JSON object"),
    (b"{}}", "not JSON"),
])
def test_odd_json_is_a_model_file_error(raw, words):
    with pytest.raises(ModelFileError, match=words):
        parse_header(raw)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=40)


@settings(FUZZ, max_examples=120)
@given(_json)
def test_nesting_check_agrees_with_the_decoded_depth(value):
    raw = json.dumps(value).encode()
    assert nests_deeper_than(raw, MAX_HEADER_NESTING) == (_depth(value) > MAX_HEADER_NESTING)
    outcome(raw)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_never_escape_as_another_exception(raw):
    outcome(raw)


@FUZZ
@given(st.binary(min_size=8, max_size=8))
def test_header_length_of_any_prefix_is_a_length_or_a_refusal(prefix):
    try:
        length = header_length(prefix)
    except ModelFileError as exc:
        assert exc.code in {"corrupt_safetensors", "pickle_checkpoint"}
    else:
        assert 2 <= length == struct.unpack("<Q", prefix)[0]


_dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "Q4", "", "f32"])


@st.composite
def _headers(draw) -> bytes:
    """A header that is valid or nearly so: tensors tiling the data, then sometimes one field
    broken (a dtype, a shape, an offset, an extra key, the metadata), and the text sometimes
    cut, spliced or padded with brackets."""
    document: dict[str, Any] = {}
    position = 0
    for index in range(draw(st.integers(1, 5))):
        dtype = draw(_dtypes)
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = 4
        for dim in shape:
            size *= dim
        document[f"t{index}.lora_A.weight"] = {"dtype": dtype, "shape": shape,
                                                "data_offsets": [position, position + size]}
        position += size
    name = draw(st.sampled_from(sorted(document)))
    entry = document[name]
    breakage = draw(st.sampled_from(["none", "shape", "offsets", "extra", "metadata", "type"]))
    if breakage == "shape":
        entry["shape"] = draw(_json)
    elif breakage == "offsets":
        entry["data_offsets"] = draw(_json)
    elif breakage == "extra":
        entry[draw(st.text(max_size=5))] = draw(_json)
    elif breakage == "metadata":
        document["__metadata__"] = draw(_json)
    elif breakage == "type":
        document[name] = draw(_json)
    raw = json.dumps(document).encode()
    edit = draw(st.sampled_from(["none", "cut", "splice", "wrap"]))
    if edit == "cut":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif edit == "splice":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=20)) + raw[at:]
    elif edit == "wrap":
        depth = draw(st.integers(1, 50))
        raw = b"[" * depth + raw + b"]" * draw(st.integers(0, depth))
    return raw


@FUZZ
@given(_headers())
def test_near_valid_headers_parse_or_are_refused_and_classify_cleanly(raw):
    result = outcome(raw)
    if isinstance(result, SafetensorsHeader):
        assert result.file_bytes == 8 + len(raw) + result.data_bytes
        with contextlib.suppress(ModelFileError):
            classify(result.names, "stable-diffusion")


def test_gateway_answers_a_nested_header_with_422_and_stores_nothing(tmp_path):
    """The upload that answered 500: POST /models with 10,001 nested arrays as the header."""
    from tests.service.inprocess import gateway_in_process

    registry = tmp_path / "models.json"  # the base is never loaded: the file is refused first
    registry.write_text(json.dumps({"models": [
        {"id": "sd-base", "family": "stable-diffusion", "path": str(tmp_path)}]}))
    raw = b"[" * 10_001 + b"]" * 10_001
    body = struct.pack("<Q", len(raw)) + raw + bytes(16)
    with gateway_in_process(tmp_path / "data", registry) as http:
        answer = http.post("/models", data={"finetuned_from": "sd-base"},
                           files={"file": ("deep.safetensors", body)})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"][0]
    assert detail["type"] == "corrupt_safetensors" and "nests deeper" in detail["msg"]
    assert not list((tmp_path / "data" / "storage").rglob("*.safetensors"))


def test_a_valid_header_still_parses_after_the_checks():
    raw = json.dumps({"__metadata__": {"instance_prompt": "sks"},
                      "b.lora_B.weight": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]},
                      "a.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    header = parse_header(raw.encode())
    assert header.data_bytes == 16 and header.metadata == {"instance_prompt": "sks"}
