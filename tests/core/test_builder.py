"""Building local events: shape per room version (checked against the spec's
PDU schemas), hashes and signatures (checked against Synapse)."""

import copy
import functools
from pathlib import Path
from urllib.parse import unquote, urlsplit

import jsonschema
import pytest
import referencing
import yaml
from referencing.jsonschema import DRAFT202012
from signedjson.key import decode_signing_key_base64, get_verify_key
from signedjson.sign import verify_signed_json
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
from synapse.crypto.event_signing import (
    add_hashes_and_signatures,
    check_event_content_hash,
    compute_event_reference_hash,
)
from synapse.events import make_event_from_dict
from synapse.synapse_rust.events import redact_event_dict

from crypto.b64 import encode_base64
from crypto.keys import generate_signing_key
from homeserver.core.builder import build_event, make_v1_event_id, reference_hash_b64
from homeserver.core.room_versions import KNOWN_ROOM_VERSIONS
from homeserver.core.signatures import content_hash_matches
from homeserver.core.validation import (
    EventFormatError,
    EventSizeError,
    canonical_size,
    check_pdu_format,
)

SPEC_DATA = Path(__file__).parents[2].parent / "shared/matrix-spec/data"
V = KNOWN_ROOM_VERSIONS
ALL = list(V.values())
KEY = generate_signing_key("bld")
SYNAPSE_KEY = decode_signing_key_base64("ed25519", "bld", encode_base64(bytes(KEY.signing_key)))

# The spec has one PDU definition per event format, not per room version.
SCHEMA_FOR_VERSION = {
    "1": "pdu_v1",
    "2": "pdu_v1",
    "3": "pdu_v3",
    "4": "pdu_v4",
    "5": "pdu_v4",
    "6": "pdu_v6",
    "7": "pdu_v6",
    "8": "pdu_v6",
    "9": "pdu_v6",
    "10": "pdu_v6",
    "11": "pdu_v11",
    "12": "pdu_v12",
}


def _retrieve(uri):
    path = Path(unquote(urlsplit(uri).path))
    return referencing.Resource.from_contents(
        yaml.safe_load(path.read_text()), default_specification=DRAFT202012
    )


@functools.cache
def pdu_validator(version: str) -> jsonschema.Draft202012Validator:
    path = SPEC_DATA / "api/server-server/definitions" / f"{SCHEMA_FOR_VERSION[version]}.yaml"
    schema = {**yaml.safe_load(path.read_text()), "$id": path.as_uri()}
    return jsonschema.Draft202012Validator(
        schema, registry=referencing.Registry(retrieve=_retrieve)
    )


def _ids(rv):
    return f"room{rv.identifier}"


def _room_id(rv):
    return "!" + "R" * 43 if rv.room_id_is_create_event_hash else "!room:hs"


def build(rv, **fields):
    args = dict(
        server_name="hs",
        signing_key=KEY,
        event_type="m.room.message",
        sender="@alice:hs",
        content={"msgtype": "m.text", "body": "hello"},
        room_id=_room_id(rv),
        prev_events=["$prev1:hs", "$prev2:hs"],
        auth_events=["$auth:hs"],
        depth=7,
        origin_server_ts=1_700_000_000_123,
        reference_hashes=lambda e: "h" + e[1:5],
    )
    args.update(fields)
    return build_event(rv, **args)


KINDS = {
    "message": {},
    "name": dict(event_type="m.room.name", state_key="", content={"name": "Room"}),
    "join": dict(
        event_type="m.room.member",
        state_key="@alice:hs",
        content={"membership": "join", "displayname": "Alice"},
    ),
    "power_levels": dict(
        event_type="m.room.power_levels",
        state_key="",
        content={"users": {"@alice:hs": 100}, "invite": 0},
    ),
    "redaction": dict(
        event_type="m.room.redaction", redacts="$victim:hs", content={"reason": "spam"}
    ),
    "create": dict(
        event_type="m.room.create",
        state_key="",
        prev_events=[],
        auth_events=[],
        depth=1,
        content={"room_version": "x"},
    ),
    "unsigned": dict(unsigned={"age": 10, "transaction_id": "t"}),
}


def _build_kind(rv, kind):
    fields = dict(KINDS[kind])
    if kind == "create":
        fields["content"] = {"room_version": rv.identifier}
        if rv.room_id_is_create_event_hash:
            fields["room_id"] = None
    return build(rv, **fields)


@pytest.mark.parametrize("rv", ALL, ids=_ids)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_matches_spec_schema(rv, kind):
    pdu = _build_kind(rv, kind)
    data = copy.deepcopy(pdu.data)
    if rv.room_id_is_create_event_hash and kind == "create":
        # pdu_v12 lists room_id as required, but its own description and
        # rooms/v12 (event format; auth rule 1.2) say the create event has
        # none: its room id is derived from its event id. Validate the rest.
        assert "room_id" not in data
        data["room_id"] = pdu.room_id
    errors = [e.message for e in pdu_validator(rv.identifier).iter_errors(data)]
    assert errors == []
    check_pdu_format(pdu.data, rv)


@pytest.mark.parametrize("rv", ALL, ids=_ids)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_synapse_accepts_hashes_signature_and_event_id(rv, kind):
    pdu = _build_kind(rv, kind)
    srv = SYNAPSE_VERSIONS[rv.identifier]
    event = make_event_from_dict(copy.deepcopy(pdu.data), srv)
    assert event.event_id == pdu.event_id
    assert event.room_id == pdu.room_id
    assert check_event_content_hash(event)
    assert content_hash_matches(pdu)
    redacted = redact_event_dict(srv, copy.deepcopy(pdu.data))
    verify_signed_json(redacted, "hs", get_verify_key(SYNAPSE_KEY))
    assert reference_hash_b64(pdu) == encode_base64(compute_event_reference_hash(event)[1])


@pytest.mark.parametrize("rv", ALL, ids=_ids)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_same_bytes_as_synapse_signing(rv, kind):
    # Synapse's add_hashes_and_signatures on the same dict gives identical
    # hashes and (deterministic ed25519) signatures.
    pdu = _build_kind(rv, kind)
    unsigned = pdu.data.get("unsigned")
    theirs = {
        k: v
        for k, v in copy.deepcopy(pdu.data).items()
        if k not in ("hashes", "signatures", "unsigned")
    }
    add_hashes_and_signatures(SYNAPSE_VERSIONS[rv.identifier], theirs, "hs", SYNAPSE_KEY)
    if unsigned is not None:
        theirs["unsigned"] = unsigned
    assert theirs == pdu.data


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_reference_shape(rv):
    pdu = build(rv)
    if rv.event_id_in_pdu:
        assert pdu.data["prev_events"] == [
            ["$prev1:hs", {"sha256": "hprev"}],
            ["$prev2:hs", {"sha256": "hprev"}],
        ]
        assert pdu.event_id == pdu.data["event_id"] and pdu.event_id.endswith(":hs")
        assert pdu.prev_event_ids == ("$prev1:hs", "$prev2:hs")
        with pytest.raises(ValueError, match="reference hashes"):
            build(rv, reference_hashes=None)
    else:
        assert pdu.data["prev_events"] == ["$prev1:hs", "$prev2:hs"]
        assert "event_id" not in pdu.data
        with pytest.raises(ValueError):
            build(rv, event_id="$mine:hs")
    assert "origin" not in pdu.data


def test_v1_event_ids():
    ids = {make_v1_event_id("hs.example") for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("$") and i.endswith(":hs.example") for i in ids)
    assert build(V["1"], event_id="$given:hs").event_id == "$given:hs"


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_redacts_placement(rv):
    pdu = build(rv, **KINDS["redaction"])
    if rv.redaction_rules.value >= 11:
        # pdu_v11 has no top-level redacts; it moved into content (MSC2174).
        assert "redacts" not in pdu.data
        assert pdu.content == {"reason": "spam", "redacts": "$victim:hs"}
    else:
        assert pdu.data["redacts"] == "$victim:hs" and "redacts" not in pdu.content
    assert pdu.redacts == "$victim:hs"
    with pytest.raises(ValueError):
        build(rv, redacts="$x:hs")  # not a redaction event


def test_room12_create_and_room_id():
    rv = V["12"]
    create = _build_kind(rv, "create")
    assert "room_id" not in create.data
    assert create.room_id == "!" + create.event_id[1:]
    with pytest.raises(ValueError, match="no room_id"):
        build(rv, **{**KINDS["create"], "room_id": "!x"})
    with pytest.raises(ValueError, match="room_id is required"):
        build(rv, room_id=None)
    with pytest.raises(ValueError, match="create event"):
        build(rv, room_id=create.room_id, auth_events=[create.event_id])
    msg = build(rv, room_id=create.room_id, auth_events=[])
    assert msg.room_id == create.room_id


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_depth_is_capped(rv):
    # Rooms 1-5 allow up to 2^63-1 on paper, but canonical JSON (and Synapse's
    # MAX_DEPTH) stops at 2^53-1 for every version.
    assert build(rv, depth=2**62).depth == 2**53 - 1


def test_size_limits():
    rv = V["11"]
    with pytest.raises(EventSizeError, match="bytes"):
        build(rv, content={"body": "x" * 65536})
    with pytest.raises(EventSizeError):
        build(rv, content={"body": "x" * 65000}, unsigned={"pad": "y" * 1000})
    with pytest.raises(EventSizeError, match="type"):
        build(rv, event_type="t" * 256)
    with pytest.raises(EventSizeError, match="state_key"):
        build(rv, event_type="m.room.name", state_key="é" * 128)
    with pytest.raises(EventFormatError, match="canonical"):
        build(rv, content={"n": 1.5})
    # Just under the limit builds, and passes the receiver's check.
    base = build(rv, content={"body": ""})
    room = 65536 - canonical_size(base.data)
    check_pdu_format(build(rv, content={"body": "x" * room}).data, rv)


def test_unsigned_is_not_covered():
    pdu = build(V["10"], unsigned={"age": 5})
    assert pdu.data["unsigned"] == {"age": 5}
    assert content_hash_matches(pdu)
    assert build(V["10"]).event_id == pdu.event_id
