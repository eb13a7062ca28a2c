"""The OpenAPI document describes both kinds of job body, and every reference in it resolves."""

from __future__ import annotations

import json
import re

from fastapi.testclient import TestClient

from api.main import create_app


def test_openapi_references_resolve() -> None:
    document = TestClient(create_app()).get("/openapi.json").json()
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "file" in body["multipart/form-data"]["schema"]["required"]
    assert "items" in body["application/json"]["schema"]["required"]
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document)))
    assert refs and refs <= set(schemas), refs - set(schemas)
