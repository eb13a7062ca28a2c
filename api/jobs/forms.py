"""Request bodies that FastAPI cannot type by itself: one route takes JSON or a multipart upload."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from api.jobs.schemas import FileJob, JobCreate
from gemma_batch.errors import FieldError, InvalidRequest

Model = TypeVar("Model", bound=BaseModel)

# Form fields whose value is JSON text (everything else is plain text).
JSON_FIELDS = ("params", "metadata", "json_schema")


def parse_json(model: type[Model], body: bytes) -> Model:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(_with_body_loc(exc)) from None


def parse_form(model: type[Model], form: dict[str, Any]) -> Model:
    """Form fields into `model`: JSON fields decoded, `choices` as JSON or comma-separated."""
    values: dict[str, Any] = {}
    for name, raw in form.items():
        text = str(raw)
        if name in JSON_FIELDS or (name == "choices" and text.lstrip().startswith("[")):
            try:
                values[name] = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidRequest([FieldError(name, f"is not valid JSON ({exc.msg})")]) from None
        elif name == "choices":
            values[name] = [choice.strip() for choice in text.split(",")] if text.strip() else []
        elif name == "chat":
            values[name] = text.lower() in ("1", "true", "yes", "on")
        else:
            values[name] = text
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(_with_body_loc(exc)) from None


def _with_body_loc(exc: ValidationError) -> list[Any]:
    return [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]


REF = "#/components/schemas/{model}"


def job_request_body() -> dict[str, Any]:
    """OpenAPI description of POST /v1/jobs' two body kinds."""
    upload = FileJob.model_json_schema(ref_template=REF)
    upload["properties"] = {
        "file": {"type": "string", "format": "binary", "description": "JSONL, CSV or Parquet"},
        **upload["properties"],
    }
    upload["required"] = ["file", *upload.get("required", [])]
    upload.pop("$defs", None)
    json_body = JobCreate.model_json_schema(ref_template=REF)
    json_body.pop("$defs", None)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": json_body},
                "multipart/form-data": {"schema": upload},
            },
        }
    }


def install_body_schemas(app: FastAPI) -> None:
    """Put the schemas the bodies above refer to into the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (JobCreate, FileJob):
                components.update(model.model_json_schema(ref_template=REF).get("$defs", {}))
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]
