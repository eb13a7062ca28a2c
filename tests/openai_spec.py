"""OpenAI's published response schemas (vendored by scripts/vendor_openai_schemas.py), to check
every body the OpenAI-compatible API answers."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMAS = Path(__file__).parent / "openai_schemas.json"


@cache
def _validator(name: str) -> Draft202012Validator:
    document = json.loads(SCHEMAS.read_text())
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    )


def check(name: str, body: Any) -> Any:
    """The body, once it validates against OpenAI's schema `name`; else an AssertionError."""
    errors = sorted(_validator(name).iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, f"{name}: {errors[0].message} at {list(errors[0].absolute_path)}"
    return body
