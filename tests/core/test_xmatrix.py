"""X-Matrix request authentication and per-server signature checks."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from signedjson.key import decode_signing_key_base64, get_verify_key
from signedjson.sign import sign_json as signedjson_sign
from signedjson.sign import verify_signed_json

from crypto.b64 import encode_base64
from crypto.keys import generate_signing_key
from crypto.signing import SignatureError, sign_json
from crypto.xmatrix import (
    XMatrixAuthorization,
    XMatrixHeaderError,
    check_server_signatures,
    check_signed_json,
    format_authorization,
    is_valid_server_name,
    parse_authorization,
    parse_authorization_params,
    request_json,
    sign_request,
    verify_request,
)

KEY = generate_signing_key("k1")
OTHER = generate_signing_key("k2")
URI = "/_matrix/federation/v1/send/123?limit=10&a=%20b"
BODY = {"pdus": [], "edus": [{"edu_type": "m.typing", "content": {"x": "日本"}}]}


def _synapse_key(key):
    return decode_signing_key_base64("ed25519", key.version, encode_base64(bytes(key.signing_key)))


def test_sign_parse_verify_round_trip():
    header = sign_request(KEY, "origin.example", "dest.example", "PUT", URI, BODY)
    assert header.startswith('X-Matrix origin="origin.example",destination="dest.example",key=')
    auth = parse_authorization(header)
    assert auth == XMatrixAuthorization(
        "origin.example", KEY.key_id, auth.signature, "dest.example"
    )
    verify_request(
        auth, KEY.verify_key, method="PUT", uri=URI, our_server_name="dest.example", content=BODY
    )


def test_get_without_body():
    header = sign_request(KEY, "a.example", "b.example", "GET", "/_matrix/key/v2/server")
    verify_request(
        parse_authorization(header),
        KEY.verify_key,
        method="GET",
        uri="/_matrix/key/v2/server",
        our_server_name="b.example",
    )


def test_signature_is_the_spec_object_signed_with_signedjson():
    # Synapse signs {method, uri, origin, destination, content} with signedjson.
    header = sign_request(KEY, "a.example", "b.example", "POST", URI, BODY)
    auth = parse_authorization(header)
    obj = request_json("POST", URI, "a.example", "b.example", BODY)
    expected = signedjson_sign(dict(obj), "a.example", _synapse_key(KEY))
    assert expected["signatures"]["a.example"][KEY.key_id] == auth.signature
    verify_signed_json(
        {**obj, "signatures": {"a.example": {KEY.key_id: auth.signature}}},
        "a.example",
        get_verify_key(_synapse_key(KEY)),
    )


def test_synapse_parser_reads_our_header():
    from synapse.federation.transport.server._base import _parse_auth_header

    header = sign_request(KEY, "a.example:8448", "[::1]:8008", "GET", URI)
    auth = parse_authorization(header)
    assert _parse_auth_header(header.encode()) == (
        "a.example:8448",
        KEY.key_id,
        auth.signature,
        "[::1]:8008",
    )


@pytest.mark.parametrize(
    "field, value",
    [("method", "POST"), ("uri", URI + "&x=1"), ("content", {"pdus": [1]}), ("content", None)],
)
def test_tampering_fails(field, value):
    header = sign_request(KEY, "a.example", "b.example", "PUT", URI, BODY)
    request = {"method": "PUT", "uri": URI, "content": BODY, field: value}
    with pytest.raises(SignatureError):
        verify_request(
            parse_authorization(header), KEY.verify_key, our_server_name="b.example", **request
        )


def test_wrong_key_or_destination_fails():
    auth = parse_authorization(sign_request(KEY, "a.example", "b.example", "GET", URI))
    with pytest.raises(SignatureError):
        verify_request(auth, OTHER.verify_key, method="GET", uri=URI, our_server_name="b.example")
    with pytest.raises(SignatureError, match="not c.example"):
        verify_request(auth, KEY.verify_key, method="GET", uri=URI, our_server_name="c.example")


def test_missing_destination_is_checked_against_our_name():
    obj = request_json("GET", URI, "a.example", "b.example")
    signature = sign_json(obj, "a.example", KEY)["signatures"]["a.example"][KEY.key_id]
    header = f'X-Matrix origin=a.example,key="{KEY.key_id}",sig="{signature}"'
    auth = parse_authorization(header)
    assert auth.destination is None
    verify_request(auth, KEY.verify_key, method="GET", uri=URI, our_server_name="b.example")
    with pytest.raises(SignatureError):
        verify_request(auth, KEY.verify_key, method="GET", uri=URI, our_server_name="c.example")


@pytest.mark.parametrize(
    "header",
    [
        'X-Matrix origin="o.example",destination="d.example",key="ed25519:1",sig="abc"',
        "X-Matrix origin=o.example,destination=d.example,key=ed25519:1,sig=abc",
        'X-Matrix   ORIGIN="o.example" ,\tDestination = "d.example",KEY="ed25519:1" , Sig="abc"',
        'x-matrix sig="abc",key="ed25519:1",destination="d.example",origin="o.example"',
        'X-Matrix origin="o\\.example",destination="d.example",key="ed25519:1",sig="a\\bc"',
        'X-Matrix origin="o.example",,destination="d.example",key="ed25519:1",sig="abc",',
        'X-Matrix origin="o.example",destination="d.example",key="ed25519:1",sig="abc",x="y, z"',
        'X-Matrix origin="o.example",destination="d.example",key="ed25519:1",signature="abc"',
    ],
)
def test_parse_grammar_variants(header):
    assert parse_authorization(header) == XMatrixAuthorization(
        "o.example", "ed25519:1", "abc", "d.example"
    )


def test_unquoted_base64_value():
    params = parse_authorization_params("X-Matrix sig=ab+/cd==,key=ed25519:a_b")
    assert params == {"sig": "ab+/cd==", "key": "ed25519:a_b"}


def test_escapes_in_quoted_values():
    params = parse_authorization_params(r'X-Matrix a="x\"y\\z, w",b="\,"')
    assert params == {"a": 'x"y\\z, w', "b": ","}


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer abc",
        "X-Matrixorigin=a",
        'X-Matrix origin="a.example",origin="b.example",key="ed25519:1",sig="x"',
        'X-Matrix origin="a.example",key="ed25519:1"',
        'X-Matrix key="ed25519:1",sig="x"',
        'X-Matrix origin="a.example" key="ed25519:1",sig="x"',
        'X-Matrix origin="a.example",key="ed25519:1",sig="x',
        'X-Matrix origin,key="ed25519:1",sig="x"',
        'X-Matrix origin="evil/path",key="ed25519:1",sig="x"',
        'X-Matrix origin="a.example",destination="b example",key="ed25519:1",sig="x"',
    ],
)
def test_parse_errors(header):
    with pytest.raises(XMatrixHeaderError):
        parse_authorization(header)


@pytest.mark.parametrize(
    "name, valid",
    [
        ("a.example", True),
        ("a.example:8448", True),
        ("1.2.3.4", True),
        ("[::1]", True),
        ("[::1]:80", True),
        ("", False),
        ("a.example:", False),
        ("a_b.example", False),
        ("a.example:123456", False),
        ("[::1", False),
        ("a.example/x", False),
    ],
)
def test_server_name_grammar(name, valid):
    assert is_valid_server_name(name) is valid


_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40
)


@settings(max_examples=200, deadline=None)
@given(key=_values, signature=_values)
def test_format_parse_round_trip(key, signature):
    auth = XMatrixAuthorization("o.example", key, signature, "d.example:8448")
    assert parse_authorization(format_authorization(auth)) == auth


# --- check_server_signatures / check_signed_json ---------------------------


def _lookup(*keys):
    table = {("a.example", k.key_id): k.verify_key for k in keys}
    return lambda server, key_id: table.get((server, key_id))


def test_signed_json_checks():
    obj = sign_json({"x": 1, "unsigned": {"y": 2}}, "a.example", KEY)
    check_signed_json(obj, "a.example", _lookup(KEY))
    # Unknown keys are skipped, but at least one key must be known.
    both = sign_json(obj, "a.example", OTHER)
    check_signed_json(both, "a.example", _lookup(KEY))
    with pytest.raises(SignatureError, match="no known key"):
        check_signed_json(obj, "a.example", _lookup(OTHER))
    with pytest.raises(SignatureError, match="not signed by"):
        check_signed_json(obj, "b.example", _lookup(KEY))
    # A known key that does not verify fails even if another one does.
    forged = {
        **both,
        "signatures": {
            "a.example": {
                **both["signatures"]["a.example"],
                OTHER.key_id: obj["signatures"]["a.example"][KEY.key_id],
            }
        },
    }
    with pytest.raises(SignatureError, match="bad signature"):
        check_signed_json(forged, "a.example", _lookup(KEY, OTHER))
    with pytest.raises(SignatureError):
        check_signed_json({**obj, "x": 2}, "a.example", _lookup(KEY))


def test_non_ed25519_and_malformed_signatures():
    obj = sign_json({"x": 1}, "a.example", KEY)
    sig = obj["signatures"]["a.example"][KEY.key_id]
    lookup = lambda s, k: KEY.verify_key  # noqa: E731 - any id resolves
    check_server_signatures(
        {"a.example": {"curve25519:x": "junk", KEY.key_id: sig}}, b'{"x":1}', "a.example", lookup
    )
    with pytest.raises(SignatureError):
        check_server_signatures(
            {"a.example": {"curve25519:x": sig}}, b'{"x":1}', "a.example", lookup
        )
    for bad in ("!!!", 5, sig[:-2], None):
        with pytest.raises(SignatureError):
            check_server_signatures(
                {"a.example": {KEY.key_id: bad}}, b'{"x":1}', "a.example", lookup
            )
    for signatures in (None, [], {"a.example": "x"}):
        with pytest.raises(SignatureError):
            check_server_signatures(signatures, b'{"x":1}', "a.example", lookup)
