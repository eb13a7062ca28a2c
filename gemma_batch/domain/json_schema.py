"""JSON Schema for structured output: checked once where a job comes in, used again on answers.

A schema comes from a tenant, so it may only refer inside itself (`#/$defs/...`): a `$ref` to a
URL or a file would make the service fetch or read it, and show what it found in an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry

# Keywords that point at another schema by URI.
REFERENCES = ("$ref", "$dynamicRef", "$recursiveRef")
# No retrieval at all: a reference the schema does not itself hold stays unresolved.
NO_REMOTE = Registry()


def _outside_refs(node: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in REFERENCES and isinstance(value, str) and not value.startswith("#"):
                yield f"{path}/{key}", value
            elif key == "$id":  # a base URI would make '#/...' refer to another document
                yield f"{path}/{key}", str(value)
            elif key not in ("const", "enum", "default", "examples"):  # values, not schemas
                yield from _outside_refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _outside_refs(value, f"{path}/{index}")


def check_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema itself, or a ValueError saying why it is not a usable JSON Schema."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    for where, ref in _outside_refs(schema, "#"):
        raise ValueError(
            f"{where} names '{ref[:200]}': a schema may only refer inside itself "
            "('#/$defs/...'); no URL, file or '$id'"
        )
    return schema


def first_violation(value: Any, schema: dict[str, Any]) -> str | None:
    """Why `value` does not match `schema` (the first problem, in a stable order), or None."""
    validator = Draft202012Validator(schema, registry=NO_REMOTE)
    errors = sorted(validator.iter_errors(value), key=str)
    return errors[0].message if errors else None
