"""JSON Schema for structured output: checked once where a job comes in, used again on answers."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError


def check_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema itself, or a ValueError saying why it is not a valid JSON Schema."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    return schema


def first_violation(value: Any, schema: dict[str, Any]) -> str | None:
    """Why `value` does not match `schema` (the first problem, in a stable order), or None."""
    errors = sorted(Draft202012Validator(schema).iter_errors(value), key=str)
    return errors[0].message if errors else None
