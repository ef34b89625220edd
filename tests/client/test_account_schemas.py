"""Each account request schema accepts the spec's request examples for its endpoint.

The spec gives some request examples whole (``example``/``examples``) and
others property by property; both kinds are checked. Only the tests read the
spec; the server never does.
"""

from pathlib import Path
from typing import Any

import pytest
import yaml

from client_api.schemas import accounts as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import validate

API = Path(__file__).resolve().parents[2].parent / "shared/matrix-spec/data/api/client-server"

ENDPOINTS = [
    ("registration.yaml", "/register", "post", schemas.REGISTER),
    ("login.yaml", "/login", "post", schemas.LOGIN),
    ("login_token.yaml", "/login/get_token", "post", schemas.GET_LOGIN_TOKEN),
    ("password_management.yaml", "/account/password", "post", schemas.CHANGE_PASSWORD),
    ("account_deactivation.yaml", "/account/deactivate", "post", schemas.DEACTIVATE),
    ("device_management.yaml", "/devices/{deviceId}", "put", schemas.UPDATE_DEVICE),
    ("device_management.yaml", "/devices/{deviceId}", "delete", schemas.DELETE_DEVICE),
    ("device_management.yaml", "/delete_devices", "post", schemas.DELETE_DEVICES),
    ("admin.yaml", "/v1/admin/lock/{userId}", "put", schemas.ADMIN_LOCK),
    ("admin.yaml", "/v1/admin/suspend/{userId}", "put", schemas.ADMIN_SUSPEND),
]


def _resolve(node: Any, base: Path) -> Any:
    """Inline ``$ref``s to other files (enough for the request bodies used here)."""
    if isinstance(node, dict):
        if "$ref" in node and "#" not in node["$ref"]:
            target = base / node["$ref"]
            return _resolve(yaml.safe_load(target.read_text()), target.parent)
        return {k: _resolve(v, base) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, base) for v in node]
    return node


def _example_of(schema: dict[str, Any]) -> Any:
    """A whole example from a schema: its own, or one assembled from its properties'."""
    if "example" in schema:
        return schema["example"]
    for part in schema.get("allOf", []):
        found = _example_of(part)
        if found is not None:
            return found
    properties = schema.get("properties")
    if not properties:
        return None
    assembled = {}
    for name, prop in properties.items():
        value = _example_of(prop)
        if value is not None:
            assembled[name] = value
    return assembled or None


def request_examples(filename: str, path: str, method: str) -> list[Any]:
    api = yaml.safe_load((API / filename).read_text())
    body = api["paths"][path][method]["requestBody"]
    media = _resolve(body["content"]["application/json"], API)
    examples = []
    for holder in (media, media.get("schema", {})):
        if "example" in holder:
            examples.append(holder["example"])
        examples.extend(e["value"] for e in holder.get("examples", {}).values())
    assembled = _example_of({"properties": media.get("schema", {}).get("properties", {})})
    if assembled is not None:
        examples.append(assembled)
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


def test_spec_examples_are_the_expected_ones():
    # Guards the example collection itself: these come from property examples.
    (register,) = request_examples("registration.yaml", "/register", "post")
    assert register["username"] == "cheeky_monkey" and register["auth"]["session"] == "xxxxx"
    login = request_examples("login.yaml", "/login", "post")[0]
    assert login["identifier"] == {"type": "m.id.user", "user": "cheeky_monkey"}
    (delete,) = request_examples("device_management.yaml", "/delete_devices", "post")
    assert delete["devices"] == ["QBUAZIFURK", "AUIECTSRND"]


@pytest.mark.parametrize(
    ("body", "schema"),
    [
        ({"username": 5}, schemas.REGISTER),
        ({"auth": "dummy"}, schemas.REGISTER),
        ({"inhibit_login": "yes"}, schemas.REGISTER),
        ({}, schemas.LOGIN),
        ({"type": "m.login.password", "identifier": {"user": "a"}}, schemas.LOGIN),
        ({"type": "m.login.password", "password": 123}, schemas.LOGIN),
        ({"logout_devices": True}, schemas.CHANGE_PASSWORD),
        ({"new_password": None}, schemas.CHANGE_PASSWORD),
        ({"erase": "true"}, schemas.DEACTIVATE),
        ({"display_name": 7}, schemas.UPDATE_DEVICE),
        ({"display_name": "x" * 101}, schemas.UPDATE_DEVICE),
        ({"auth": []}, schemas.DELETE_DEVICE),
        ({"devices": "ABC"}, schemas.DELETE_DEVICES),
        ({"devices": [1]}, schemas.DELETE_DEVICES),
        ({"nonce": "n", "username": "u", "password": "p"}, schemas.ADMIN_REGISTER),
        ({"nonce": "n", "username": "u", "password": "p", "mac": "m", "admin": "yes"},
         schemas.ADMIN_REGISTER),
        ({"uses_allowed": "1"}, schemas.NEW_REGISTRATION_TOKEN),
        ({"expiry_time": 1.5}, schemas.UPDATE_REGISTRATION_TOKEN),
        ({}, schemas.ADMIN_LOCK),
        ({"suspended": 1}, schemas.ADMIN_SUSPEND),
    ],
)
def test_schemas_refuse_wrong_shapes(body, schema):
    with pytest.raises(MatrixError) as e:
        validate(body, schema)
    assert e.value.errcode == "M_BAD_JSON"
