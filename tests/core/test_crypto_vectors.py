"""Every vector in ../shared/matrix-spec/test-vectors.json that applies to us."""

import copy
import json
import re
from pathlib import Path

import pytest

from crypto.b64 import decode_base64, encode_base64
from crypto.canonical_json import encode_canonical_json, parse_json
from crypto.hashes import add_content_hash, content_hash, content_hash_matches
from crypto.keys import decode_verify_key, signing_key_from_seed
from crypto.signing import SignatureError, sign_json, verify_signature
from crypto.xmatrix import (
    check_signed_json,
    is_valid_server_name,
    parse_authorization,
    verify_request,
)
from homeserver.core.events import Pdu
from homeserver.core.redaction import redact_pdu
from homeserver.core.room_versions import DEFAULT_ROOM_VERSION, KNOWN_ROOM_VERSIONS
from homeserver.core.signatures import server_name_of, verify_pdu_signatures
from homeserver.core.validation import EventFormatError, check_pdu_format

SPEC = Path(__file__).parents[2].parent / "shared/matrix-spec"
VECTORS = json.loads((SPEC / "test-vectors.json").read_text())
PRE_V11 = [v for v in KNOWN_ROOM_VERSIONS.values() if v.redaction_rules.value < 11]
V11_PLUS = [v for v in KNOWN_ROOM_VERSIONS.values() if v.redaction_rules.value >= 11]


def _ids(entries):
    return [str(i) for i in range(len(entries))]


@pytest.fixture(scope="module")
def spec_key():
    vec = VECTORS["signing_key"]
    version = vec["key_id"].split(":", 1)[1]
    return signing_key_from_seed(version, decode_base64(vec["seed_base64"]))


# --- unpadded base64 ----------------------------------------------------------


@pytest.mark.parametrize("vec", VECTORS["unpadded_base64"], ids=_ids(VECTORS["unpadded_base64"]))
def test_unpadded_base64(vec):
    raw = vec["input_utf8"].encode()
    assert encode_base64(raw) == vec["expected"]
    assert decode_base64(vec["expected"]) == raw


# --- canonical JSON -----------------------------------------------------------


@pytest.mark.parametrize("vec", VECTORS["canonical_json"], ids=_ids(VECTORS["canonical_json"]))
def test_canonical_json(vec):
    assert encode_canonical_json(parse_json(vec["input"])) == vec["expected"].encode("utf-8")


def test_canonical_json_integral_exponent_is_an_int():
    # The README's caveat: {"a": -0, "b": 1e10} only reproduces if integral
    # floats parse as ints - which parse_json does.
    assert encode_canonical_json(parse_json('{"a": -0, "b": 1e10}')) == b'{"a":0,"b":10000000000}'


# --- signing key --------------------------------------------------------------


def test_signing_key(spec_key):
    vec = VECTORS["signing_key"]
    assert spec_key.key_id == vec["key_id"]
    assert spec_key.public_key_base64 == vec["derived_public_key_base64"]


# --- JSON signing -------------------------------------------------------------


@pytest.mark.parametrize("vec", VECTORS["json_signing"], ids=_ids(VECTORS["json_signing"]))
def test_json_signing(vec, spec_key):
    server = VECTORS["signing_key"]["server_name"]
    signed = sign_json(vec["input"], server, spec_key)
    assert signed == vec["expected_signed"]
    verify_signature(vec["expected_signed"], server, spec_key.key_id, spec_key.verify_key)
    check_signed_json(vec["expected_signed"], server, lambda s, k: spec_key.verify_key)


# --- event signing (room v1-v10 redaction rules keep "origin") ---------------


@pytest.mark.parametrize("vec", VECTORS["event_signing"], ids=_ids(VECTORS["event_signing"]))
def test_event_content_hash(vec):
    expected = vec["expected_content_hash_sha256"]
    assert encode_base64(content_hash(vec["input"])) == expected
    assert add_content_hash(vec["input"])["hashes"] == {"sha256": expected}
    assert content_hash_matches(vec["expected_signed"])


def _sign_event(event, room_version, server, key):
    hashed = add_content_hash(event)
    signatures = sign_json(redact_pdu(hashed, room_version), server, key)["signatures"]
    return {**hashed, "signatures": signatures}


@pytest.mark.parametrize("room_version", PRE_V11, ids=lambda v: f"room{v.identifier}")
@pytest.mark.parametrize("vec", VECTORS["event_signing"], ids=_ids(VECTORS["event_signing"]))
def test_event_signing_pre_v11(vec, room_version, spec_key):
    server = VECTORS["signing_key"]["server_name"]
    assert _sign_event(vec["input"], room_version, server, spec_key) == vec["expected_signed"]
    pdu = Pdu(room_version, vec["expected_signed"].get("event_id", "$x"), vec["expected_signed"])
    lookup = {(server, spec_key.key_id): spec_key.verify_key}
    if room_version.event_id_in_pdu and "event_id" not in pdu.data:
        return  # rooms 1-2 also need the event id's server; vector 0 has no event id
    verify_pdu_signatures(pdu, lambda s, k: lookup.get((s, k)))
    # The signature covers the redacted form, so it survives redaction.
    verify_pdu_signatures(pdu.redacted(), lambda s, k: lookup.get((s, k)))


@pytest.mark.parametrize("room_version", V11_PLUS, ids=lambda v: f"room{v.identifier}")
@pytest.mark.parametrize("vec", VECTORS["event_signing"], ids=_ids(VECTORS["event_signing"]))
def test_event_signing_v11_differs(vec, room_version, spec_key):
    # README: v11+ redaction drops "origin", so the spec's signatures do not
    # reproduce (and do not verify) under those rules.
    server = VECTORS["signing_key"]["server_name"]
    signed = _sign_event(vec["input"], room_version, server, spec_key)
    assert signed["signatures"] != vec["expected_signed"]["signatures"]
    pdu = Pdu(room_version, "$x", vec["expected_signed"])
    with pytest.raises(SignatureError):
        verify_pdu_signatures(pdu, lambda s, k: spec_key.verify_key)


# --- identifiers / room versions ---------------------------------------------


@pytest.mark.parametrize(
    "example", VECTORS["identifier_grammar"]["server_names"]["examples"], ids=lambda e: e["value"]
)
def test_server_name_examples(example):
    assert example["valid"] and is_valid_server_name(example["value"])
    # Server names may hold ':' (ports, IPv6); the localpart never does.
    assert server_name_of("@user:" + example["value"]) == example["value"]


def test_server_names_are_case_sensitive():
    a, b = VECTORS["identifier_grammar"]["server_names"]["case_sensitivity"]["different_user_ids"]
    assert server_name_of(a) != server_name_of(b)


@pytest.mark.parametrize(
    "example",
    VECTORS["identifier_grammar"]["event_id_format_examples"],
    ids=lambda e: e["value"],
)
def test_event_id_shapes(example):
    # "$" + 43 characters of unpadded base64 of a sha256: standard alphabet in
    # room 3, URL-safe from room 4 - the shape compute_event_id produces.
    alphabet = r"[A-Za-z0-9+/]" if example["room_versions"] == "3" else r"[A-Za-z0-9_-]"
    assert re.fullmatch(r"\$" + alphabet + "{43}", example["value"])
    assert len(decode_base64(example["value"][1:])) == 32


def test_user_id_max_bytes_enforced_on_sender():
    limit = VECTORS["identifier_grammar"]["user_id_localpart_mapping_suggested"][
        "user_id_max_bytes"
    ]
    room_version = KNOWN_ROOM_VERSIONS["10"]
    event = {
        "type": "m.room.message",
        "room_id": "!r:hs",
        "content": {},
        "depth": 1,
        "origin_server_ts": 1,
        "hashes": {"sha256": "x"},
        "signatures": {},
        "prev_events": [],
        "auth_events": [],
    }
    ok_sender = "@" + "u" * (limit - 4) + ":hs"
    assert len(ok_sender) == limit
    check_pdu_format({**event, "sender": ok_sender}, room_version)
    with pytest.raises(EventFormatError):
        check_pdu_format({**event, "sender": "@u" + ok_sender[1:]}, room_version)


def test_room_versions_match_spec_list():
    listed = [v["version"] for v in VECTORS["room_versions"]["versions"]]
    assert listed == list(KNOWN_ROOM_VERSIONS)
    assert VECTORS["room_versions"]["default_for_new_rooms"] == DEFAULT_ROOM_VERSION


# --- illustrative examples: must NOT verify ----------------------------------


def test_illustrative_signed_object_does_not_verify():
    (example,) = [
        e for e in VECTORS["illustrative_examples"] if "object" in e and not e["verified"]
    ]
    obj = copy.deepcopy(example["object"])
    server = obj["name"]
    keys = {k: decode_verify_key(v) for k, v in obj["signing_keys"].items()}
    with pytest.raises(SignatureError):
        check_signed_json(obj, server, lambda s, k: keys.get(k) if s == server else None)
    key_id = next(iter(keys))
    with pytest.raises(SignatureError):
        verify_signature(obj, server, key_id, keys[key_id])


def test_illustrative_xmatrix_header_parses_but_does_not_verify(spec_key):
    (example,) = [e for e in VECTORS["illustrative_examples"] if "header_value" in e]
    assert not example["verified"]
    auth = parse_authorization(example["header_value"])
    params = example["expected_params"]
    assert (auth.origin, auth.destination, auth.key_id, auth.signature) == (
        params["origin"],
        params["destination"],
        params["key"],
        params["sig"],
    )
    with pytest.raises(SignatureError):
        verify_request(
            auth,
            spec_key.verify_key,
            method="POST",
            uri="/target",
            our_server_name=params["destination"],
        )
