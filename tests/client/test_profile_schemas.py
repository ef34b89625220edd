"""Each profile / user directory request schema accepts the spec's request examples."""

from pathlib import Path

import pytest
import yaml

from client_api.profile import BODY_SCHEMAS
from client_api.schemas import profiles as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import validate

API = Path(__file__).resolve().parents[2].parent / "shared/matrix-spec/data/api/client-server"


def load(filename: str) -> dict:
    return yaml.safe_load((API / filename).read_text())


def request_examples(operation: dict) -> list:
    media = operation["requestBody"]["content"]["application/json"]
    examples = []
    for holder in (media, media.get("schema", {})):
        if "example" in holder:
            examples.append(holder["example"])
        examples.extend(e["value"] for e in holder.get("examples", {}).values())
    return examples


def property_example(operation: dict) -> dict:
    """A body built from the per-property examples of the request schema."""
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    return {
        name: prop["example"] for name, prop in schema["properties"].items() if "example" in prop
    }


def profile_field_examples() -> list[tuple[str, dict]]:
    """(keyName, body) pairs: the PUT example, and one body per field of GET /profile's example."""
    api = load("profile.yaml")
    put = api["paths"]["/profile/{userId}/{keyName}"]["put"]
    pairs = []
    for example in request_examples(put):
        ((key, _),) = example.items()
        pairs.append((key, example))
    response = api["paths"]["/profile/{userId}"]["get"]["responses"]["200"]["content"]
    for value in response["application/json"]["examples"].values():
        for key, field in value["value"].items():
            pairs.append((key, {key: field}))
    return pairs


def test_put_profile_field_examples():
    pairs = profile_field_examples()
    keys = {key for key, _ in pairs}
    assert {"displayname", "avatar_url", "m.tz"} <= keys, keys
    assert any(key not in BODY_SCHEMAS for key in keys), "a custom key is covered too"
    for key, body in pairs:
        schema = BODY_SCHEMAS.get(key, schemas.SET_PROFILE_FIELD)
        assert validate(body, schema) == body


def test_user_directory_search_example():
    operation = load("users.yaml")["paths"]["/user_directory/search"]["post"]
    examples = request_examples(operation) + [property_example(operation)]
    assert {"search_term": "foo", "limit": 10} in examples
    for example in examples:
        assert validate(example, schemas.USER_DIRECTORY_SEARCH) == example


@pytest.mark.parametrize(
    ("body", "schema"),
    [
        ({"displayname": 5}, schemas.SET_DISPLAYNAME),
        ({"displayname": ["Alice"]}, schemas.SET_DISPLAYNAME),
        ({"avatar_url": {"url": "mxc://a/b"}}, schemas.SET_AVATAR_URL),
        ({"m.tz": 1}, schemas.SET_TIMEZONE),
        ({}, schemas.SET_PROFILE_FIELD),
        ([], schemas.SET_PROFILE_FIELD),
        ({}, schemas.USER_DIRECTORY_SEARCH),
        ({"search_term": 3}, schemas.USER_DIRECTORY_SEARCH),
        ({"search_term": "a", "limit": "10"}, schemas.USER_DIRECTORY_SEARCH),
    ],
)
def test_schemas_refuse_wrong_shapes(body, schema):
    with pytest.raises(MatrixError) as e:
        validate(body, schema)
    assert e.value.errcode == "M_BAD_JSON"
