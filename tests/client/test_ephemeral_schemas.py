"""Each typing / presence / account data / tags / to-device request schema accepts the
spec's request examples (whole ones, and ones assembled from property examples)."""


import pytest

from client_api.schemas import ephemeral as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import validate
from tests.support.spec import property_example, request_examples

ENDPOINTS = [
    ("typing.yaml", "/rooms/{roomId}/typing/{userId}", "put", schemas.TYPING),
    ("presence.yaml", "/presence/{userId}/status", "put", schemas.SET_PRESENCE),
    ("account-data.yaml", "/user/{userId}/account_data/{type}", "put", schemas.SET_ACCOUNT_DATA),
    (
        "account-data.yaml",
        "/user/{userId}/rooms/{roomId}/account_data/{type}",
        "put",
        schemas.SET_ROOM_ACCOUNT_DATA,
    ),
    ("tags.yaml", "/user/{userId}/rooms/{roomId}/tags/{tag}", "put", schemas.SET_TAG),
    ("to_device.yaml", "/sendToDevice/{eventType}/{txnId}", "put", schemas.SEND_TO_DEVICE),
]




@pytest.mark.parametrize(
    ("filename", "path", "method", "schema"),
    ENDPOINTS,
    ids=[f"{m.upper()} {p}" for _, p, m, _ in ENDPOINTS],
)
def test_schema_accepts_spec_examples(filename, path, method, schema):
    examples = request_examples(filename, path, method)
    assembled = property_example(filename, path, method)
    if assembled is not None:
        examples.append(assembled)
    assert examples, "the spec has a request example for this endpoint"
    for example in examples:
        assert validate(example, schema) == example


def test_assembled_examples_are_the_expected_ones():
    assert property_example("tags.yaml", "/user/{userId}/rooms/{roomId}/tags/{tag}", "put") == {
        "order": 0.25
    }
    assert property_example("to_device.yaml", "/sendToDevice/{eventType}/{txnId}", "put") == {
        "messages": {"@alice:example.com": {"TLLBEANAAG": {"example_content_key": "value"}}}
    }


@pytest.mark.parametrize(
    ("body", "schema"),
    [
        ({}, schemas.TYPING),
        ({"typing": "true"}, schemas.TYPING),
        ({"typing": True, "timeout": "30000"}, schemas.TYPING),
        ({"typing": True, "timeout": -1}, schemas.TYPING),
        ({}, schemas.SET_PRESENCE),
        ({"presence": "busy"}, schemas.SET_PRESENCE),
        ({"presence": "online", "status_msg": 5}, schemas.SET_PRESENCE),
        ([], schemas.SET_ACCOUNT_DATA),
        ("text", schemas.SET_ROOM_ACCOUNT_DATA),
        ({"order": "0.5"}, schemas.SET_TAG),
        ({}, schemas.SEND_TO_DEVICE),
        ({"messages": []}, schemas.SEND_TO_DEVICE),
        ({"messages": {"alice": {"D": {}}}}, schemas.SEND_TO_DEVICE),
        ({"messages": {"@alice:x": {"D": 1}}}, schemas.SEND_TO_DEVICE),
        ({"messages": {"@alice:x": []}}, schemas.SEND_TO_DEVICE),
    ],
)
def test_schemas_refuse_wrong_shapes(body, schema):
    with pytest.raises(MatrixError) as e:
        validate(body, schema)
    assert e.value.errcode == "M_BAD_JSON"
