"""Copy the OpenAI response schemas the conformance tests validate against into tests/.

Run from the repository root with OpenAI's published specs at hand (the tests must not need them):

    python scripts/vendor_openai_schemas.py ../shared/specs

Takes each named schema and everything it refers to from openapi-main.json, and the batch
request input and output lines from the last spec that still defines them (OpenAPI 3.0, whose
`nullable` is turned into JSON Schema's `null` type here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOTS = [
    "ErrorResponse",
    "CreateChatCompletionResponse",
    "CreateCompletionResponse",
    "Model",
    "ListModelsResponse",
    "OpenAIFile",
    "ListFilesResponse",
    "DeleteFileResponse",
    "Batch",
    "ListBatchesResponse",
]
BATCH_LINES = ["BatchRequestInput", "BatchRequestOutput"]
TARGET = Path("tests/openai_schemas.json")


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[1]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


def _closure(schemas: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    taken: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in taken:
            taken[name] = schemas[name]
            todo.extend(_refs(schemas[name]))
    return taken


def _without_nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {key: _without_nullable(value) for key, value in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_without_nullable(value) for value in node]
    return node


def main(specs: Path) -> None:
    main_spec = json.loads((specs / "openapi-main.json").read_text())
    old_spec = yaml.safe_load((specs / "openapi-498c71d-2025-04-29.yaml").read_text())
    schemas = _closure(main_spec["components"]["schemas"], ROOTS)
    for name in BATCH_LINES:
        schemas[name] = _without_nullable(old_spec["components"]["schemas"][name])
    source = {
        "openapi-main.json": main_spec["info"]["version"],
        "openapi-498c71d-2025-04-29.yaml": old_spec["info"]["version"],
    }
    document = {"source": source, "components": {"schemas": dict(sorted(schemas.items()))}}
    TARGET.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"{len(schemas)} schemas into {TARGET}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
