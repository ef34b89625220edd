"""Each directory request schema accepts the spec's request examples for its endpoint."""

from pathlib import Path

import pytest
import yaml

from client_api.schemas import directory as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import validate

API = Path(__file__).resolve().parents[2].parent / "shared/matrix-spec/data/api/client-server"

ENDPOINTS = [
    ("directory.yaml", "/directory/room/{roomAlias}", "put", schemas.SET_ROOM_ALIAS),
    ("list_public_rooms.yaml", "/directory/list/room/{roomId}", "put", schemas.SET_ROOM_VISIBILITY),
    ("list_public_rooms.yaml", "/publicRooms", "post", schemas.QUERY_PUBLIC_ROOMS),
]


def request_examples(filename: str, path: str, method: str) -> list:
    api = yaml.safe_load((API / filename).read_text())
    media = api["paths"][path][method]["requestBody"]["content"]["application/json"]
    examples = []
    for holder in (media, media.get("schema", {})):
        if "example" in holder:
            examples.append(holder["example"])
        examples.extend(e["value"] for e in holder.get("examples", {}).values())
    return examples


@pytest.mark.parametrize(
    ("filename", "path", "method", "schema"),
    ENDPOINTS,
    ids=[f"{m.upper()} {p}" for _, p, m, _ in ENDPOINTS],
)
def test_schema_accepts_spec_examples(filename, path, method, schema):
    examples = request_examples(filename, path, method)
    assert examples, "the spec has a request example for this endpoint"
    for example in examples:
        assert validate(example, schema) == example


def test_schemas_refuse_wrong_shapes():
    for body, schema in [
        ({}, schemas.SET_ROOM_ALIAS),
        ({"room_id": "#not-a-room-id:example.org"}, schemas.SET_ROOM_ALIAS),
        ({"visibility": "hidden"}, schemas.SET_ROOM_VISIBILITY),
        ({"limit": "ten"}, schemas.QUERY_PUBLIC_ROOMS),
        ({"filter": {"room_types": [1]}}, schemas.QUERY_PUBLIC_ROOMS),
    ]:
        with pytest.raises(MatrixError) as e:
            validate(body, schema)
        assert e.value.errcode == "M_BAD_JSON"
