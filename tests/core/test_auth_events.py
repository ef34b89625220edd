"""Auth events selection (server-server "Auth events selection")."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeserver.core.auth_events import (
    auth_state_keys,
    auth_state_keys_for_pdu,
    select_auth_events,
)
from homeserver.core.events import Pdu
from homeserver.core.room_versions import KNOWN_ROOM_VERSIONS

V = KNOWN_ROOM_VERSIONS
ALL = list(V.values())
CREATE, PL, JR, TPI, MEMBER = (
    ("m.room.create", ""),
    ("m.room.power_levels", ""),
    ("m.room.join_rules", ""),
    "m.room.third_party_invite",
    "m.room.member",
)

STATE = {
    CREATE: "$create",
    PL: "$pl",
    JR: "$jr",
    (MEMBER, "@alice:hs"): "$alice",
    (MEMBER, "@bob:hs"): "$bob",
    (MEMBER, "@carol:other"): "$carol",
    (TPI, "tok"): "$tpi",
}


def _ids(rv):
    return f"room{rv.identifier}"


def select(rv, event_type, sender, state_key=None, content=None, state=STATE):
    return select_auth_events(rv, event_type, sender, state_key, content or {}, state)


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_create_event_cites_nothing(rv):
    assert select(rv, "m.room.create", "@alice:hs", "", {"room_version": rv.identifier}) == []


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_message(rv):
    expected = ["$pl", "$alice"]
    if int(rv.identifier) < 12:
        expected.insert(0, "$create")  # room 12: the room id implies the create event
    assert select(rv, "m.room.message", "@alice:hs") == expected
    # A sender with no membership yet: only what exists.
    assert "$dave" not in select(rv, "m.room.message", "@dave:hs")


@pytest.mark.parametrize("rv", ALL, ids=_ids)
@pytest.mark.parametrize(
    "membership, join_rules",
    [("join", True), ("invite", True), ("knock", True), ("leave", False), ("ban", False)],
)
def test_membership(rv, membership, join_rules):
    got = select(rv, "m.room.member", "@alice:hs", "@bob:hs", {"membership": membership})
    assert "$bob" in got and "$alice" in got and "$pl" in got
    assert ("$jr" in got) is join_rules
    assert ("$create" in got) is (int(rv.identifier) < 12)


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_own_membership_is_cited_once(rv):
    got = select(rv, "m.room.member", "@alice:hs", "@alice:hs", {"membership": "join"})
    assert got.count("$alice") == 1


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_third_party_invite(rv):
    content = {"membership": "invite", "third_party_invite": {"signed": {"token": "tok"}}}
    assert "$tpi" in select(rv, "m.room.member", "@alice:hs", "@bob:hs", content)
    # Only for invites, and only the matching token.
    assert "$tpi" not in select(
        rv, "m.room.member", "@alice:hs", "@bob:hs", {**content, "membership": "join"}
    )
    other = {"membership": "invite", "third_party_invite": {"signed": {"token": "nope"}}}
    assert "$tpi" not in select(rv, "m.room.member", "@alice:hs", "@bob:hs", other)
    for junk in (None, 5, {"signed": 5}, {"signed": {"token": 5}}, {}):
        malformed = {"membership": "invite", "third_party_invite": junk}
        assert "$tpi" not in select(rv, "m.room.member", "@alice:hs", "@bob:hs", malformed)


@pytest.mark.parametrize("rv", ALL, ids=_ids)
def test_restricted_join_authoriser(rv):
    content = {"membership": "join", "join_authorised_via_users_server": "@carol:other"}
    got = select(rv, "m.room.member", "@bob:hs", "@bob:hs", content)
    assert ("$carol" in got) is rv.restricted_join_rule  # room 8+
    left = select(rv, "m.room.member", "@bob:hs", "@bob:hs", {**content, "membership": "leave"})
    assert "$carol" not in left


def test_stable_order_and_keys():
    content = {"membership": "join", "join_authorised_via_users_server": "@carol:other"}
    assert auth_state_keys(V["10"], MEMBER, "@alice:hs", "@bob:hs", content) == [
        CREATE,
        PL,
        (MEMBER, "@alice:hs"),
        (MEMBER, "@bob:hs"),
        JR,
        (MEMBER, "@carol:other"),
    ]
    assert auth_state_keys(V["12"], "m.room.message", "@alice:hs", None, {}) == [
        PL,
        (MEMBER, "@alice:hs"),
    ]


def test_for_pdu():
    data = {
        "type": MEMBER,
        "sender": "@a:hs",
        "state_key": "@b:hs",
        "content": {"membership": "invite"},
        "room_id": "!r:hs",
    }
    pdu = Pdu(V["11"], "$e", data)
    assert auth_state_keys_for_pdu(pdu) == [CREATE, PL, (MEMBER, "@a:hs"), (MEMBER, "@b:hs"), JR]


# --- differential: Synapse's auth_types_for_event -----------------------------

_users = st.sampled_from(["@alice:hs", "@bob:hs", "@carol:other"])
_member_content = st.fixed_dictionaries(
    {"membership": st.sampled_from(["join", "invite", "knock", "leave", "ban"])},
    optional={
        "join_authorised_via_users_server": _users,
        "third_party_invite": st.fixed_dictionaries(
            {"signed": st.fixed_dictionaries({"token": st.sampled_from(["tok", "x"])})}
        ),
    },
)


@settings(max_examples=200, deadline=None)
@given(
    rv=st.sampled_from(ALL),
    event_type=st.sampled_from([MEMBER, "m.room.message", "m.room.power_levels", "m.room.name"]),
    sender=_users,
    target=_users,
    content=_member_content,
)
def test_matches_synapse(rv, event_type, sender, target, content):
    from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
    from synapse.event_auth import auth_types_for_event
    from synapse.events import make_event_from_dict

    data = {
        "type": event_type,
        "sender": sender,
        "content": content,
        "room_id": "!r:hs",
        "state_key": target,
        "prev_events": [],
        "auth_events": [],
        "depth": 1,
        "origin_server_ts": 0,
        "hashes": {},
        "signatures": {},
    }
    if rv.event_id_in_pdu:
        data["event_id"] = "$e:hs"
    synapse_rv = SYNAPSE_VERSIONS[rv.identifier]
    theirs = set(auth_types_for_event(synapse_rv, make_event_from_dict(data, synapse_rv)))
    ours = set(auth_state_keys(rv, event_type, sender, target, content))
    # Synapse's list is "what may be needed to auth the event" and always
    # includes the create event; in room 12 the spec says it must NOT be
    # selected for auth_events (rooms/v12 "Authorisation rules", rule 3.2).
    if not rv.create_event_in_auth_events:
        theirs.discard(CREATE)
    assert ours == theirs
