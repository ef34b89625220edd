"""Each /keys/* request schema accepts the spec's request examples (whole ones, and
ones assembled from property examples) and refuses bodies of the wrong shape."""


import pytest

from client_api.schemas import keys as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import validate
from tests.support.spec import property_example, request_examples

ENDPOINTS = [
    ("keys.yaml", "/keys/upload", "post", schemas.UPLOAD_KEYS),
    ("keys.yaml", "/keys/query", "post", schemas.QUERY_KEYS),
    ("keys.yaml", "/keys/claim", "post", schemas.CLAIM_KEYS),
    (
        "cross_signing.yaml",
        "/keys/device_signing/upload",
        "post",
        schemas.UPLOAD_CROSS_SIGNING_KEYS,
    ),
    ("cross_signing.yaml", "/keys/signatures/upload", "post", schemas.UPLOAD_SIGNATURES),
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
    upload = property_example("keys.yaml", "/keys/upload", "post")
    assert set(upload) == {"one_time_keys", "fallback_keys"}
    assert upload["fallback_keys"]["signed_curve25519:AAAAGj"]["fallback"] is True
    assert property_example("keys.yaml", "/keys/query", "post") == {
        "timeout": 10000,
        "device_keys": {"@alice:example.com": []},
    }
    assert property_example("keys.yaml", "/keys/claim", "post") == {
        "timeout": 10000,
        "one_time_keys": {"@alice:example.com": {"JLAFKJWSCS": "signed_curve25519"}},
    }


DEVICE_KEYS = {
    "user_id": "@alice:example.com",
    "device_id": "JLAFKJWSCS",
    "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
    "keys": {"ed25519:JLAFKJWSCS": "key"},
    "signatures": {"@alice:example.com": {"ed25519:JLAFKJWSCS": "sig"}},
}


@pytest.mark.parametrize(
    ("body", "schema"),
    [
        ([], schemas.UPLOAD_KEYS),
        ({"device_keys": {"user_id": "@alice:example.com"}}, schemas.UPLOAD_KEYS),
        ({"device_keys": {**DEVICE_KEYS, "keys": {"ed25519:X": 1}}}, schemas.UPLOAD_KEYS),
        ({"one_time_keys": {"nocolon": "key"}}, schemas.UPLOAD_KEYS),
        ({"one_time_keys": {"signed_curve25519:A": {"key": "k"}}}, schemas.UPLOAD_KEYS),
        ({"fallback_keys": {"signed_curve25519:A": 5}}, schemas.UPLOAD_KEYS),
        ({}, schemas.QUERY_KEYS),
        ({"device_keys": {"alice": []}}, schemas.QUERY_KEYS),
        ({"device_keys": {"@alice:example.com": "JLAFKJWSCS"}}, schemas.QUERY_KEYS),
        ({}, schemas.CLAIM_KEYS),
        ({"one_time_keys": {"@alice:example.com": ["D"]}}, schemas.CLAIM_KEYS),
        ({"one_time_keys": {"@alice:example.com": {"D": 1}}}, schemas.CLAIM_KEYS),
        (
            {"master_key": {"user_id": "@a:b", "usage": ["master"]}},
            schemas.UPLOAD_CROSS_SIGNING_KEYS,
        ),
        (
            {"master_key": {"user_id": "@a:b", "usage": ["other"], "keys": {"ed25519:k": "k"}}},
            schemas.UPLOAD_CROSS_SIGNING_KEYS,
        ),
        (
            {"master_key": {"user_id": "@a:b", "usage": ["master"], "keys": {}}},
            schemas.UPLOAD_CROSS_SIGNING_KEYS,
        ),
        ({"auth": "password"}, schemas.UPLOAD_CROSS_SIGNING_KEYS),
        ({"alice": {}}, schemas.UPLOAD_SIGNATURES),
        ({"@alice:example.com": {"DEVICE": "signed"}}, schemas.UPLOAD_SIGNATURES),
    ],
)
def test_schemas_refuse_wrong_shapes(body, schema):
    with pytest.raises(MatrixError) as e:
        validate(body, schema)
    assert e.value.errcode == "M_BAD_JSON"
