"""The OpenAPI document as client generators read it (``/openapi.json``).

FastAPI's own document is right for its docs pages but loses things a generated client needs
(openapi-python-client is the one the tests run; docs/SERVICE.md, "A client generated from
the OpenAPI document"):

- a form body that mixes a settings model with files is an ``allOf`` of the model plus the file
  fields, which generators collapse to the model alone, so the client cannot send images;
- uploaded files are ``contentMediaType: application/octet-stream`` strings (OpenAPI 3.1), which
  generators do not take for files: they want ``format: binary``;
- operations are named ``authenticate_authenticate_post`` (name, path and method).

:func:`operation_id` names each operation by its route function (``get_job``), and
:func:`install_client_ready_openapi` rewrites multipart bodies as one flat object whose files
are binary strings. Binary responses (pictures, the PDF) are declared where their routes are.
What the service accepts and answers is unchanged: only the description of it is.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

MULTIPART = "multipart/form-data"
#: A file in a request or response, the way client generators recognise one.
BINARY: dict[str, Any] = {"type": "string", "format": "binary"}
#: Responses that are one binary file, for ``responses={200: ...}`` of a route.
PNG_RESPONSE: dict[str, Any] = {"content": {"image/png": {"schema": BINARY}}}
PDF_RESPONSE: dict[str, Any] = {"content": {"application/pdf": {"schema": BINARY}}}


def operation_id(route: APIRoute) -> str:
    """The route function's name (``authenticate``, ``get_job``): the name a generated client
    gives the call, so it has to read well and stay put (tests/service/test_openapi_client.py
    lists them)."""
    return route.name


def install_client_ready_openapi(app: FastAPI) -> None:
    """Serve FastAPI's document with flat multipart bodies (built once, on first request)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            flatten_multipart_bodies(build())  # build() caches it in app.openapi_schema
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it


def flatten_multipart_bodies(spec: dict[str, Any]) -> None:
    """Every multipart request body schema (``Body_<operation>`` components and inline ones)
    becomes one object: ``allOf`` parts merged into its properties, files as binary strings, and
    no ``null`` alternatives (a form has no null; a field left out is the default)."""
    schemas = spec.get("components", {}).get("schemas", {})
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            media = operation.get("requestBody", {}).get("content", {}).get(MULTIPART)
            if not media or "schema" not in media:
                continue
            schema = media["schema"]
            ref = schema.get("$ref", "")
            target = schemas[ref.rsplit("/", 1)[-1]] if ref else schema
            _flatten(target, schemas)


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return schemas[ref.rsplit("/", 1)[-1]] if ref else schema


def _flatten(schema: dict[str, Any], schemas: dict[str, Any]) -> None:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for part in schema.pop("allOf", []):
        part = _resolve(part, schemas)
        properties.update(copy.deepcopy(part.get("properties", {})))
        required += part.get("required", [])
    properties.update(schema.get("properties", {}))
    required += schema.get("required", [])
    schema["type"] = "object"
    schema["properties"] = {name: _form_field(value) for name, value in properties.items()}
    if required:
        schema["required"] = list(dict.fromkeys(required))


def _form_field(schema: dict[str, Any]) -> dict[str, Any]:
    """One form field: a file as a binary string, a list of files as an array of them; a
    ``T | None`` field as ``T`` with the other keywords (title, description, default) kept."""
    options = schema.get("anyOf")
    if options is not None:
        kept = [option for option in options if option.get("type") != "null"]
        if len(kept) == 1:
            rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
            if schema.get("default") is not None:
                rest["default"] = schema["default"]
            schema = {**kept[0], **rest}
    if schema.get("type") == "string" and "contentMediaType" in schema:
        schema = {k: v for k, v in schema.items() if k != "contentMediaType"} | BINARY
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        schema = {**schema, "items": _form_field(schema["items"])}
    return schema
