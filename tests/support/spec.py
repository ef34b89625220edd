"""The Matrix spec's definitions (../shared/matrix-spec), for tests only.

The running server never reads these files; tests use them to check our own
schemas and responses against the spec.
"""

import json
from functools import cache
from pathlib import Path
from typing import Any

import yaml

SPEC = Path(__file__).resolve().parents[3] / "shared" / "matrix-spec"
DATA = SPEC / "data"


@cache
def load_yaml(relative: str) -> Any:
    return yaml.safe_load((DATA / relative).read_text())


def client_server_operation(filename: str, path: str, method: str) -> dict[str, Any]:
    return load_yaml(f"api/client-server/{filename}")["paths"][path][method]


def request_examples(filename: str, path: str, method: str) -> list[Any]:
    """Every JSON request-body example the spec gives for one endpoint."""
    operation = client_server_operation(filename, path, method)
    content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
    examples = []
    if "example" in content:
        examples.append(content["example"])
    for example in (content.get("examples") or {}).values():
        value = example.get("value")
        examples.append(json.loads(value) if isinstance(value, str) else value)
    schema_example = content.get("schema", {}).get("example")
    if schema_example is not None:
        examples.append(schema_example)
    return examples


def _follow_file_ref(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a ``$ref`` to another client-server file (tags.yaml's body is one)."""
    ref = node.get("$ref")
    if ref and "#" not in ref:
        return load_yaml(str((DATA / "api/client-server" / ref).relative_to(DATA)))
    return node


def property_example(filename: str, path: str, method: str) -> dict[str, Any] | None:
    """A body made of the request schema's per-property examples, if it has any."""
    operation = client_server_operation(filename, path, method)
    schema = _follow_file_ref(operation["requestBody"]["content"]["application/json"]["schema"])
    body = {
        name: prop["example"]
        for name, prop in schema.get("properties", {}).items()
        if "example" in prop
    }
    return body or None


def test_vectors() -> dict[str, Any]:
    return json.loads((SPEC / "test-vectors.json").read_text())
