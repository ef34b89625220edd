"""PDU format checks (receipt step 1) and the receive path of signatures.py."""

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.canonical_json import encode_canonical_json
from crypto.keys import generate_signing_key
from crypto.signing import SignatureError
from homeserver.core.builder import build_event
from homeserver.core.room_versions import KNOWN_ROOM_VERSIONS
from homeserver.core.signatures import (
    content_hash_matches,
    key_validity_ts,
    must_redact,
    required_signers,
    verify_pdu_signatures,
    verify_received_pdu,
)
from homeserver.core.validation import (
    MAX_PDU_SIZE,
    EventFormatError,
    EventSizeError,
    canonical_size,
    check_pdu_format,
    size_with_members,
)

ALL = list(KNOWN_ROOM_VERSIONS.values())
V = KNOWN_ROOM_VERSIONS
KEY = generate_signing_key("k")
REMOTE = generate_signing_key("r")
KEYS = {("hs", KEY.key_id): KEY.verify_key, ("remote", REMOTE.key_id): REMOTE.verify_key}


def lookup(server, key_id):
    return KEYS.get((server, key_id))


def _ids(rv):
    return f"room{rv.identifier}"


def make(rv, **fields):
    args = dict(
        server_name="hs",
        signing_key=KEY,
        event_type="m.room.message",
        sender="@a:hs",
        content={"body": "hi"},
        room_id="!r:hs",
        prev_events=["$p:hs"],
        auth_events=["$a:hs"],
        depth=5,
        origin_server_ts=1_700_000_000_000,
        reference_hashes=lambda e: "h" * 43,
    )
    args.update(fields)
    return build_event(rv, **args)


def good(rv):
    return copy.deepcopy(make(rv).data)


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_built_events_pass(rv):
    check_pdu_format(good(rv), rv)


REQUIRED = [
    "type",
    "sender",
    "content",
    "depth",
    "origin_server_ts",
    "hashes",
    "signatures",
    "prev_events",
    "auth_events",
    "room_id",
]


@pytest.mark.parametrize("rv", ALL, ids=_ids)
@pytest.mark.parametrize("key", REQUIRED + ["event_id"])
def test_required_keys(rv, key):
    data = good(rv)
    if key not in data:
        assert key == "event_id" and not rv.event_id_in_pdu
        return
    del data[key]
    with pytest.raises(EventFormatError):
        check_pdu_format(data, rv)


BAD_VALUES = [
    ("type", 5),
    ("sender", "a:hs"),
    ("sender", "@a"),
    ("sender", "@a:"),
    ("sender", None),
    ("content", []),
    ("content", "x"),
    ("depth", "5"),
    ("depth", True),
    ("depth", -1),
    ("depth", 2**63),
    ("origin_server_ts", 1.5),
    ("origin_server_ts", None),
    ("hashes", {}),
    ("hashes", {"sha256": 1}),
    ("hashes", "x"),
    ("signatures", []),
    ("signatures", {"hs": "x"}),
    ("signatures", {"hs": {"ed25519:k": 1}}),
    ("unsigned", []),
    ("state_key", 1),
    ("state_key", None),
    ("prev_events", "x"),
    ("auth_events", {}),
    ("prev_events", [1]),
    ("auth_events", [None]),
    ("room_id", 5),
    ("room_id", "r:hs"),
]


@pytest.mark.parametrize("rv", ALL, ids=_ids)
@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_field_values(rv, key, value):
    data = good(rv)
    data[key] = value
    with pytest.raises(EventFormatError):
        check_pdu_format(data, rv)


def test_reference_shapes_per_version():
    v1 = good(V["1"])
    v1["prev_events"] = ["$p:hs"]  # rooms 1-2 need [id, hashes] pairs
    with pytest.raises(EventFormatError, match="pairs"):
        check_pdu_format(v1, V["1"])
    v1["prev_events"] = [["$p:hs", {}]]
    with pytest.raises(EventFormatError, match="sha256"):
        check_pdu_format(v1, V["1"])
    v4 = good(V["4"])
    v4["auth_events"] = [["$p", {"sha256": "x"}]]
    with pytest.raises(EventFormatError):
        check_pdu_format(v4, V["4"])
    v1 = good(V["2"])
    v1["event_id"] = "$no-domain"
    with pytest.raises(EventFormatError):
        check_pdu_format(v1, V["2"])


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_reference_count_limits(rv):
    ref = ["$x:hs", {"sha256": "h"}] if rv.event_id_in_pdu else "$x"
    for key, limit in (("prev_events", 20), ("auth_events", 10)):
        data = good(rv)
        data[key] = [ref] * limit
        check_pdu_format(data, rv)
        data[key] = [ref] * (limit + 1)
        with pytest.raises(EventFormatError, match=key):
            check_pdu_format(data, rv)


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_depth_limit(rv):
    # Rooms 1-5: below 2^63-1 (pdu_v1/v3/v4); rooms 6+: canonical JSON range (depth_v6).
    data = good(rv)
    data["depth"] = 2**53 - 1
    check_pdu_format(data, rv)
    data["depth"] = 2**53
    with pytest.raises(EventFormatError):
        check_pdu_format(data, rv)  # rooms 1-5 too: our canonical JSON is always strict


@pytest.mark.parametrize("rv", ALL, ids=_ids)
@pytest.mark.parametrize("value", [1.5, 2**53, -(2**53), float("nan")])
def test_strict_canonical_json(rv, value):
    # Room 6+ must refuse these; rooms 1-5 should tolerate them but our
    # canonical JSON encoder cannot hash them, so they are refused there too.
    data = good(rv)
    data["content"] = {"n": [value]}
    with pytest.raises(EventFormatError, match="canonical"):
        check_pdu_format(data, rv)


@pytest.mark.parametrize("rv", ALL, ids=_ids)
@pytest.mark.parametrize("key", ["type", "state_key", "sender", "room_id", "event_id"])
def test_id_size_limits(rv, key):
    data = good(rv)
    if key == "event_id" and not rv.event_id_in_pdu:
        return
    sigil = {"sender": "@", "room_id": "!", "event_id": "$"}.get(key, "")
    at_limit = sigil + "x" * (255 - len(sigil) - 3) + ":hs"
    assert len(at_limit) == 255
    data[key] = at_limit
    check_pdu_format(data, rv)
    data[key] = sigil + "x" + at_limit[len(sigil) :]
    with pytest.raises(EventSizeError) as err:
        check_pdu_format(data, rv)
    assert not err.value.rejectable  # too many code points: always dropped
    # Under 255 code points but over 255 bytes: Synapse stores these as rejected
    # (not dropped) in rooms 1-10.
    data[key] = sigil + "é" * 150 + ":hs"
    with pytest.raises(EventFormatError, match="bytes") as err:
        check_pdu_format(data, rv)
    assert err.value.rejectable == (int(rv.identifier) <= 10)


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_whole_event_size(rv):
    data = good(rv)
    base = canonical_size(data)
    data["content"]["pad"] = ""
    data["content"]["pad"] = "x" * (MAX_PDU_SIZE - canonical_size(data))
    assert canonical_size(data) == MAX_PDU_SIZE
    check_pdu_format(data, rv)
    data["content"]["pad"] += "x"
    with pytest.raises(EventSizeError, match="bytes"):
        check_pdu_format(data, rv)
    assert base < MAX_PDU_SIZE
    # Signatures count too.
    data["content"]["pad"] = data["content"]["pad"][:-200]
    check_pdu_format(data, rv)
    data["signatures"]["other"] = {"ed25519:x": "s" * 200}
    with pytest.raises(EventFormatError):
        check_pdu_format(data, rv)


def test_room12_create_has_no_room_id():
    rv = V["12"]
    create = make(
        rv,
        event_type="m.room.create",
        state_key="",
        room_id=None,
        content={},
        prev_events=[],
        auth_events=[],
        depth=1,
    )
    check_pdu_format(create.data, rv)
    msg = good(rv)
    del msg["room_id"]
    with pytest.raises(EventFormatError, match="room_id"):
        check_pdu_format(msg, rv)


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_event_id_only_in_rooms_1_2(rv):
    data = good(rv)
    data["event_id"] = "$x:hs"
    if rv.event_id_in_pdu:
        check_pdu_format(data, rv)
    else:
        with pytest.raises(EventFormatError, match="event_id"):
            check_pdu_format(data, rv)


def test_redacts_type_pre_v11():
    data = good(V["10"])
    data.update(type="m.room.redaction", redacts=5)
    with pytest.raises(EventFormatError, match="redacts"):
        check_pdu_format(data, V["10"])


def test_not_a_dict():
    with pytest.raises(EventFormatError):
        check_pdu_format([], V["10"])


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=6,
)


@settings(max_examples=100, deadline=None)
@given(
    base=st.dictionaries(st.text(max_size=5), _json, min_size=1, max_size=5),
    extra=st.dictionaries(st.text(max_size=5), _json, max_size=3),
)
def test_size_with_members_is_exact(base, extra):
    base = {k: v for k, v in base.items() if k not in extra}
    if not base:
        return
    assert size_with_members(len(encode_canonical_json(base)), extra) == len(
        encode_canonical_json({**base, **extra})
    )


# --- receive path: signatures and hashes --------------------------------------


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_verify_received_pdu(rv):
    pdu = make(rv)
    received, ok = verify_received_pdu(copy.deepcopy(pdu.data), rv, lookup)
    assert ok and received.event_id == pdu.event_id and received.data == pdu.data
    assert content_hash_matches(pdu) and not must_redact(pdu)
    assert key_validity_ts(pdu) == (pdu.origin_server_ts if rv.enforce_key_validity else 0)

    # Changed unredacted content: signature still good, hash fails -> redacted.
    data = copy.deepcopy(pdu.data)
    data["content"]["body"] = "changed"
    received, ok = verify_received_pdu(data, rv, lookup)
    assert not ok and received.data["content"] == {} and received.event_id == pdu.event_id

    # Changed redacted-form field: signature fails.
    data = copy.deepcopy(pdu.data)
    data["origin_server_ts"] += 1
    with pytest.raises(SignatureError):
        verify_received_pdu(data, rv, lookup)
    # Unknown key: nothing to check with.
    with pytest.raises(SignatureError, match="no known key"):
        verify_received_pdu(copy.deepcopy(pdu.data), rv, lambda s, k: None)
    # Unsigned data is not covered.
    received, ok = verify_received_pdu({**pdu.data, "unsigned": {"age": 5}}, rv, lookup)
    assert ok


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_verify_received_format_and_size(rv):
    data = good(rv)
    data["depth"] = "x"
    with pytest.raises(EventFormatError):
        verify_received_pdu(data, rv, lookup)
    data = good(rv)
    data["unsigned"] = {"pad": "x" * MAX_PDU_SIZE}
    with pytest.raises(EventFormatError, match="bytes"):
        verify_received_pdu(data, rv, lookup)


def test_required_signers():
    member = dict(event_type="m.room.member", sender="@a:hs", state_key="@a:hs")
    assert required_signers(
        make(V["10"], **member, content={"membership": "join"}).data, V["10"]
    ) == {"hs"}
    # Rooms 1-2: the event id's server as well.
    v1 = make(V["1"], event_id="$x:remote")
    assert required_signers(v1.data, V["1"]) == {"hs", "remote"}
    with pytest.raises(SignatureError, match="remote"):
        verify_pdu_signatures(v1, lookup)
    # Restricted joins (room 8+): the authorising user's server.
    content = {"membership": "join", "join_authorised_via_users_server": "@b:remote"}
    for version, expected in (("7", {"hs"}), ("8", {"hs", "remote"}), ("12", {"hs", "remote"})):
        pdu = make(V[version], **member, content=content)
        assert required_signers(pdu.data, V[version]) == expected
    pdu = make(V["10"], **member, content=content)
    with pytest.raises(SignatureError, match="remote"):
        verify_pdu_signatures(pdu, lookup)
    # Only for joins.
    leave = make(V["10"], **member, content={**content, "membership": "leave"})
    assert required_signers(leave.data, V["10"]) == {"hs"}
    # A junk authoriser cannot be checked: drop.
    bad = make(V["10"], **member, content={**content, "join_authorised_via_users_server": 5})
    with pytest.raises(SignatureError):
        required_signers(bad.data, V["10"])


def test_third_party_invite_may_come_from_another_server():
    # Spec: "If the event is a 3rd party invite, the sender must already match
    # the 3rd party invite, and the server which actually sends the event may
    # be a different server." Signed by "hs" only, sender on "elsewhere".
    content = {
        "membership": "invite",
        "third_party_invite": {"signed": {"mxid": "@b:hs", "token": "t"}},
    }
    pdu = make(
        V["10"],
        event_type="m.room.member",
        sender="@a:elsewhere",
        state_key="@b:hs",
        content=content,
    )
    assert required_signers(pdu.data, V["10"]) == set()
    verify_pdu_signatures(pdu, lambda s, k: None)
    plain = make(
        V["10"],
        event_type="m.room.member",
        sender="@a:elsewhere",
        state_key="@b:hs",
        content={"membership": "invite"},
    )
    with pytest.raises(SignatureError, match="elsewhere"):
        verify_pdu_signatures(plain, lookup)
