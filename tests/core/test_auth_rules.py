"""Hand-written cases for each authorisation rule and each room-version difference.

Rule numbers follow room version 12 (rooms/v12.md "Authorisation rules");
rooms 1-11 number them one lower from rule 3 on (no room-id rule 2).
"""

import pytest

from crypto.keys import signing_key_from_seed
from crypto.signing import sign_json
from homeserver.core.auth import (
    AuthError,
    check_auth_events_are_valid,
    check_auth_rules,
    get_creators,
    get_named_power_level,
    get_required_power_level,
    get_user_power_level,
)
from homeserver.core.events import CREATE, MEMBER, POWER_LEVELS
from homeserver.core.power_levels import CREATOR_POWER_LEVEL, parse_power_level
from homeserver.core.room_versions import get_room_version
from tests.core.auth_helpers import ALICE, BOB, CAROL, DAVE, EVE, Room, standard_room

ALL = [str(n) for n in range(1, 13)]
V1_TO_11 = ALL[:-1]


def allowed(event, room: Room) -> None:
    check_auth_rules(event, room.state)


def rejected(event, room: Room, match: str | None = None) -> None:
    with pytest.raises(AuthError, match=match):
        check_auth_rules(event, room.state)


def msg(room: Room, sender: str):
    return room.make("m.room.message", sender, {"body": "hi"})


# --- rule 1: m.room.create ------------------------------------------------------------


@pytest.mark.parametrize("version", ALL)
def test_create_with_prev_events_is_rejected(version):
    room = Room(version)
    create = room.make(CREATE, ALICE, dict(room.create.content), "", prev_events=["$x:a.example"])
    rejected(create, room, "prev_events")
    allowed(room.create, room)


@pytest.mark.parametrize("version", V1_TO_11)
def test_create_room_id_server_must_be_the_senders(version):
    room = Room(version, room_id="!r:b.example")
    rejected(room.create, room, "server")


def test_create_in_room_12_must_not_have_a_room_id():
    room = Room("12")
    create = room.make(CREATE, ALICE, {"room_version": "12"}, "", extra={"room_id": room.room_id})
    rejected(create, room, "room_id")


@pytest.mark.parametrize("room_version", ["13", 12, "org.matrix.hydra.11"])
def test_create_with_unknown_content_room_version_is_rejected(room_version):
    room = Room("11", create_content={"room_version": room_version})
    rejected(room.create, room, "unknown room version")


@pytest.mark.parametrize("version", ALL)
def test_create_needs_a_creator_before_room_11(version):
    room = Room(version)
    content = {k: v for k, v in room.create.content.items() if k != "creator"}
    create = room.make(CREATE, ALICE, content, "", prev_events=[])
    if get_room_version(version).implicit_room_creator:
        allowed(create, room)
    else:
        rejected(create, room, "creator")


@pytest.mark.parametrize(
    "extra",
    [[BOB, 3], "@bob:a.example", ["bob:a.example"], ["@:a.example"], ["@bob:bad host"], [None]],
)
def test_create_additional_creators_must_be_user_ids(extra):
    rejected(Room("12", create_content={"additional_creators": extra}).create, Room("12"))
    allowed(
        Room("12", create_content={"additional_creators": [BOB, "@x:[::1]:8448"]}).create,
        Room("12"),
    )
    # Before room 12 the key means nothing and is not checked.
    allowed(Room("11", create_content={"additional_creators": extra}).create, Room("11"))


# --- rule 2 (room 12): the room id is the create event's id --------------------------------


def test_room_12_event_whose_room_id_is_not_the_create_event_is_rejected():
    room, other = standard_room("12"), standard_room("12")
    event = msg(room, BOB)
    allowed(event, room)
    rejected(event, other, "another room")
    assert room.room_id == "!" + room.create.event_id[1:]


# --- rule 3 (rule 2 before room 12): the cited auth events ----------------------------


def by_id(*rooms: Room):
    return {e.event_id: e for r in rooms for e in r.state.values()}


@pytest.mark.parametrize("version", ALL)
def test_auth_events_selected_by_the_spec_are_valid(version):
    room = standard_room(version)
    for event in (msg(room, BOB), room.make_member(BOB, CAROL, "invite")):
        check_auth_events_are_valid(event, by_id(room))


@pytest.mark.parametrize("version", ALL)
def test_auth_events_with_duplicate_state_keys_are_rejected(version):
    room = standard_room(version)
    old_pl = room.state[(POWER_LEVELS, "")]
    new_pl = room.power_levels({"users": {}})
    ids = [room.state[(MEMBER, BOB)].event_id]
    if version != "12":
        ids.append(room.create.event_id)
    event = room.make(
        "m.room.message", BOB, {}, auth_event_ids=[*ids, old_pl.event_id, new_pl.event_id]
    )
    with pytest.raises(AuthError, match="both"):
        check_auth_events_are_valid(event, {**by_id(room), old_pl.event_id: old_pl})


@pytest.mark.parametrize("version", ALL)
def test_auth_events_not_in_the_selection_are_rejected(version):
    room = standard_room(version)
    join_rules = room.state[("m.room.join_rules", "")]
    event = msg(room, BOB)
    cited = room.make(
        "m.room.message", BOB, {}, auth_event_ids=[*event.auth_event_ids, join_rules.event_id]
    )
    with pytest.raises(AuthError, match="not needed"):
        check_auth_events_are_valid(cited, by_id(room))


@pytest.mark.parametrize("version", ALL)
def test_auth_events_from_another_room_are_rejected(version):
    room, other = standard_room(version), standard_room(version)
    foreign_pl = other.state[(POWER_LEVELS, "")]
    ids = [e for e in msg(room, BOB).auth_event_ids if e != room.state[(POWER_LEVELS, "")].event_id]
    event = room.make("m.room.message", BOB, {}, auth_event_ids=[*ids, foreign_pl.event_id])
    with pytest.raises(AuthError, match="another room"):
        check_auth_events_are_valid(event, by_id(room, other))


@pytest.mark.parametrize("version", ["1", "12"])
def test_auth_events_that_were_rejected_are_rejected(version):
    room = standard_room(version)
    event = msg(room, BOB)
    with pytest.raises(AuthError, match="was rejected"):
        check_auth_events_are_valid(event, by_id(room), {room.state[(POWER_LEVELS, "")].event_id})
    with pytest.raises(AuthError, match="unknown"):
        check_auth_events_are_valid(event, {})


@pytest.mark.parametrize("version", ALL)
def test_auth_events_must_cite_the_create_event_except_in_room_12(version):
    room = standard_room(version)
    others = [e for e in msg(room, BOB).auth_event_ids if e != room.create.event_id]
    without = room.make("m.room.message", BOB, {}, auth_event_ids=others)
    with_create = room.make(
        "m.room.message", BOB, {}, auth_event_ids=[*others, room.create.event_id]
    )
    if version == "12":
        check_auth_events_are_valid(without, by_id(room))
        with pytest.raises(AuthError, match="not needed"):
            check_auth_events_are_valid(with_create, by_id(room))
    else:
        check_auth_events_are_valid(with_create, by_id(room))
        with pytest.raises(AuthError, match="missing"):
            check_auth_events_are_valid(without, by_id(room))


# --- rule 4: m.federate ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "10", "12"])
def test_non_federating_room_rejects_remote_senders(version):
    room = standard_room(version, create_content={"m.federate": False}, join_rule="public")
    room.member(CAROL, "join")
    rejected(msg(room, CAROL), room, "federate")
    allowed(msg(room, BOB), room)
    rejected(room.make_member(CAROL, CAROL, "leave"), room, "federate")


def test_non_federating_room_only_rejects_literal_false():
    # rooms/v12.md rule 4: "m.federate set to false" - Synapse treats any
    # non-true value as false.
    room = standard_room("11", create_content={"m.federate": 0})
    room.member(CAROL, "join")
    allowed(msg(room, CAROL), room)


def test_non_federating_room_checks_the_sender_not_the_target():
    # rooms/v12.md rule 4 names only "the sender domain of the event"; Synapse
    # additionally rejects a local user's invite of a remote user.
    room = standard_room("12", create_content={"m.federate": False})
    allowed(room.make_member(ALICE, CAROL, "invite"), room)


# --- rooms 1-5 rule 4: m.room.aliases -----------------------------------------------------


@pytest.mark.parametrize("version", ALL)
def test_aliases_special_case_before_room_6(version):
    room = standard_room(version)
    aliases = room.make("m.room.aliases", CAROL, {"aliases": []}, "b.example")  # not a member
    wrong = room.make("m.room.aliases", CAROL, {"aliases": []}, "a.example")
    if get_room_version(version).special_case_aliases_auth:
        allowed(aliases, room)
        rejected(wrong, room, "server name")
    else:
        rejected(aliases, room, "not in the room")


# --- rule 5: m.room.member ------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL)
def test_member_event_needs_membership_and_state_key(version):
    room = standard_room(version)
    rejected(room.make(MEMBER, CAROL, {}, CAROL), room, "membership")
    rejected(room.make(MEMBER, CAROL, {"membership": "join"}), room, "state_key")


@pytest.mark.parametrize("version", ["7", "8", "12"])
def test_join_authorised_via_server_must_have_signed_from_room_8(version):
    room = standard_room(version, join_rule="public")
    content = {"join_authorised_via_users_server": CAROL}
    join = room.make_member(DAVE, DAVE, "join", content=content, signers=("b.example",))
    unsigned = room.make_member(EVE, EVE, "join", content=content, signers=("c.example",))
    allowed(join, room)
    if get_room_version(version).restricted_join_rule:
        rejected(unsigned, room, "not signed by b.example")
    else:
        allowed(unsigned, room)


@pytest.mark.parametrize("version", ALL)
def test_join_creator_right_after_create(version):
    room = Room(version)
    first = room.make_member(ALICE, ALICE, "join", prev_events=[room.create.event_id])
    allowed(first, room)
    rejected(room.make_member(BOB, BOB, "join", prev_events=[room.create.event_id]), room)


def test_join_creator_is_the_create_sender_from_room_11():
    for version, expect_allowed in (("10", True), ("11", False)):
        room = Room(version, create_content={"creator": BOB})
        join = room.make_member(BOB, BOB, "join", prev_events=[room.create.event_id])
        (allowed if expect_allowed else rejected)(join, room)


def test_join_additional_creator_gets_no_first_join_special_case():
    room = Room("12", create_content={"additional_creators": [BOB]})
    rejected(room.make_member(BOB, BOB, "join", prev_events=[room.create.event_id]), room)


@pytest.mark.parametrize("version", ALL)
def test_join_for_someone_else_is_rejected(version):
    room = standard_room(version, join_rule="public")
    rejected(room.make_member(BOB, CAROL, "join"), room, "themselves")


@pytest.mark.parametrize("version", ALL)
def test_join_while_banned_is_rejected(version):
    room = standard_room(version, join_rule="public")
    room.member(CAROL, "ban", sender=ALICE)
    rejected(room.make_member(CAROL, CAROL, "join"), room, "banned")


@pytest.mark.parametrize("version", ALL)
def test_join_invite_only_room_needs_invite(version):
    room = standard_room(version, join_rule="invite")
    rejected(room.make_member(CAROL, CAROL, "join"), room, "invite")
    room.member(CAROL, "invite", sender=ALICE)
    allowed(room.make_member(CAROL, CAROL, "join"), room)


def test_join_without_join_rules_event_is_invite_only():
    room = standard_room("12")
    del room.state[("m.room.join_rules", "")]
    rejected(room.make_member(CAROL, CAROL, "join"), room)
    room.member(CAROL, "invite", sender=ALICE)
    allowed(room.make_member(CAROL, CAROL, "join"), room)


@pytest.mark.parametrize("version", ALL)
def test_join_public_room(version):
    room = standard_room(version, join_rule="public")
    allowed(room.make_member(CAROL, CAROL, "join"), room)


@pytest.mark.parametrize("version", ALL)
def test_join_knock_room_needs_invite_from_room_7(version):
    room = standard_room(version, join_rule="knock")
    room.member(CAROL, "invite", sender=ALICE)
    join = room.make_member(CAROL, CAROL, "join")
    if get_room_version(version).knock_join_rule:
        allowed(join, room)
    else:
        rejected(join, room, "join rule is 'knock'")


@pytest.mark.parametrize("version", ALL)
def test_join_restricted_room(version):
    room = standard_room(version, join_rule="restricted")
    via_bob = {"join_authorised_via_users_server": BOB}
    join = room.make_member(CAROL, CAROL, "join", content=via_bob)
    if not get_room_version(version).restricted_join_rule:
        rejected(join, room, "join rule is 'restricted'")
        return
    allowed(join, room)
    rejected(room.make_member(CAROL, CAROL, "join"), room, "authorised")
    via_dave = {"join_authorised_via_users_server": DAVE}
    rejected(room.make_member(CAROL, CAROL, "join", content=via_dave), room, "authorised")
    room.member(DAVE, "join")
    allowed(room.make_member(CAROL, CAROL, "join", content=via_dave), room)
    room.power_levels({"users": {ALICE: 100, BOB: 50}, "invite": 60})
    rejected(room.make_member(CAROL, CAROL, "join", content=via_bob), room, "may not invite")
    room.member(CAROL, "invite", sender=ALICE)  # invited: no authoriser needed
    allowed(room.make_member(CAROL, CAROL, "join"), room)


@pytest.mark.parametrize("version", ALL)
def test_join_knock_restricted_room_from_room_10(version):
    room = standard_room(version, join_rule="knock_restricted")
    join = room.make_member(CAROL, CAROL, "join", content={"join_authorised_via_users_server": BOB})
    if get_room_version(version).knock_restricted_join_rule:
        allowed(join, room)
    else:
        rejected(join, room, "knock_restricted")


@pytest.mark.parametrize("version", ALL)
def test_invite(version):
    room = standard_room(version)
    allowed(room.make_member(BOB, CAROL, "invite"), room)
    rejected(room.make_member(CAROL, DAVE, "invite"), room, "not in the room")
    rejected(room.make_member(BOB, ALICE, "invite"), room, "is in the room")
    room.member(CAROL, "ban", sender=ALICE)
    rejected(room.make_member(BOB, CAROL, "invite"), room, "banned")
    room.power_levels({"users": {ALICE: 100, BOB: 50}, "invite": 51})
    rejected(room.make_member(BOB, DAVE, "invite"), room, "may not invite")


# --- rule 5.4.1: third-party invites --------------------------------------------------------

ID_KEY = signing_key_from_seed("0", bytes(32))
WRONG_KEY = signing_key_from_seed("0", bytes([1] * 32))


def third_party_room(version: str = "12", **public_keys) -> Room:
    room = standard_room(version)
    content = {"display_name": "c...", **(public_keys or {"public_key": ID_KEY.public_key_base64})}
    room.put("m.room.third_party_invite", BOB, content, "tok")
    return room


def tp_invite(room: Room, sender: str = BOB, target: str = CAROL, key=ID_KEY, **signed):
    signed = {"mxid": target, "token": "tok", **signed}
    content = {
        "third_party_invite": {
            "display_name": "c...",
            "signed": sign_json(signed, "id.example", key),
        }
    }
    return room.make_member(sender, target, "invite", content=content)


@pytest.mark.parametrize("version", ALL)
def test_third_party_invite_with_valid_signature(version):
    room = third_party_room(version)
    allowed(tp_invite(room), room)
    room.member(BOB, "leave")  # not needed: rule 5.4.1 allows before rule 5.4.2
    allowed(tp_invite(room), room)


def test_third_party_invite_rejections():
    room = third_party_room()
    rejected(tp_invite(room, key=WRONG_KEY), room, "no valid signature")
    rejected(tp_invite(room, sender=ALICE), room, "someone else")
    rejected(tp_invite(room, token="other"), room, "matches the token")
    rejected(tp_invite(room, mxid=DAVE), room, "mxid")
    no_signed = room.make_member(BOB, CAROL, "invite", content={"third_party_invite": {}})
    rejected(no_signed, room, "signed")
    room.member(CAROL, "ban", sender=ALICE)
    rejected(tp_invite(room), room, "banned")


def test_third_party_invite_public_keys_list():
    room = third_party_room(
        public_keys=[
            {"public_key": WRONG_KEY.public_key_base64},
            {"public_key": ID_KEY.public_key_base64},
        ]
    )
    allowed(tp_invite(room), room)


def test_third_party_invite_any_signature_may_match():
    # rooms/v12.md rule 5.4.1.7: "If any signature in signed matches any public
    # key". Synapse stops at the first signature that fails for a key.
    room = third_party_room()
    signed = sign_json({"mxid": CAROL, "token": "tok"}, "aaa.example", WRONG_KEY)
    signed = sign_json(signed, "id.example", ID_KEY)
    content = {"third_party_invite": {"display_name": "c", "signed": signed}}
    allowed(room.make_member(BOB, CAROL, "invite", content=content), room)


# --- rule 5.5: leave ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL)
def test_leave_self(version):
    room = standard_room(version)
    allowed(room.make_member(BOB, BOB, "leave"), room)
    room.member(CAROL, "invite", sender=BOB)
    allowed(room.make_member(CAROL, CAROL, "leave"), room)
    rejected(room.make_member(DAVE, DAVE, "leave"), room, "not in")
    room.member(DAVE, "ban", sender=ALICE)
    rejected(room.make_member(DAVE, DAVE, "leave"), room, "not in")


@pytest.mark.parametrize("version", ALL)
def test_leave_self_after_knocking_from_room_7(version):
    room = standard_room(version, join_rule="knock")
    room.member(CAROL, "knock")
    leave = room.make_member(CAROL, CAROL, "leave")
    (allowed if get_room_version(version).knock_join_rule else rejected)(leave, room)


@pytest.mark.parametrize("version", ALL)
def test_kick(version):
    room = standard_room(version)
    room.member(CAROL, "join")
    allowed(room.make_member(BOB, CAROL, "leave"), room)  # 50 >= kick 50, 0 < 50
    rejected(room.make_member(BOB, ALICE, "leave"), room, "may not kick")  # higher
    rejected(room.make_member(CAROL, BOB, "leave"), room, "may not kick")
    room.power_levels({"users": {ALICE: 100, BOB: 50, CAROL: 50}})
    rejected(room.make_member(BOB, CAROL, "leave"), room, "may not kick")  # equal
    room.power_levels({"users": {ALICE: 100, BOB: 50}, "kick": 51})
    rejected(room.make_member(BOB, CAROL, "leave"), room, "may not kick")


@pytest.mark.parametrize("version", ALL)
def test_unban_needs_ban_and_kick_levels(version):
    room = standard_room(version)
    room.member(CAROL, "ban", sender=ALICE)
    allowed(room.make_member(BOB, CAROL, "leave"), room)
    room.power_levels({"users": {ALICE: 100, BOB: 50}, "ban": 60})
    rejected(room.make_member(BOB, CAROL, "leave"), room, "unban")
    room.power_levels({"users": {ALICE: 100, BOB: 50}, "kick": 60})
    rejected(room.make_member(BOB, CAROL, "leave"), room, "kick")


@pytest.mark.parametrize("version", ALL)
def test_ban(version):
    room = standard_room(version)
    allowed(room.make_member(BOB, CAROL, "ban"), room)
    rejected(room.make_member(BOB, ALICE, "ban"), room, "may not ban")
    rejected(room.make_member(CAROL, DAVE, "ban"), room, "not in the room")
    room.power_levels({"users": {ALICE: 100, BOB: 50}, "ban": 51})
    rejected(room.make_member(BOB, CAROL, "ban"), room, "may not ban")


@pytest.mark.parametrize("version", ALL)
def test_knock(version):
    room = standard_room(version, join_rule="knock")
    knock = room.make_member(CAROL, CAROL, "knock")
    if not get_room_version(version).knock_join_rule:
        rejected(knock, room, "unknown membership")
        return
    allowed(knock, room)
    rejected(room.make_member(BOB, CAROL, "knock"), room, "themselves")
    rejected(room.make_member(BOB, BOB, "knock"), room, "join")
    room.member(CAROL, "invite", sender=BOB)
    rejected(room.make_member(CAROL, CAROL, "knock"), room, "invite")
    room.member(DAVE, "ban", sender=ALICE)
    rejected(room.make_member(DAVE, DAVE, "knock"), room, "ban")
    room.join_rule("public")
    rejected(room.make_member(EVE, EVE, "knock"), room, "does not accept knocks")
    room.join_rule("knock_restricted")
    knock = room.make_member(EVE, EVE, "knock")
    (allowed if get_room_version(version).knock_restricted_join_rule else rejected)(knock, room)


@pytest.mark.parametrize("version", ["1", "12"])
def test_unknown_membership_is_rejected(version):
    room = standard_room(version)
    rejected(room.make_member(BOB, BOB, "dance"), room, "unknown membership")


# --- rules 6-9 ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL)
def test_sender_must_be_joined(version):
    room = standard_room(version)
    allowed(msg(room, BOB), room)
    rejected(msg(room, CAROL), room, "not in the room")
    room.member(CAROL, "invite", sender=BOB)
    rejected(msg(room, CAROL), room, "not in the room")


@pytest.mark.parametrize("version", ALL)
def test_third_party_invite_event_needs_invite_level_only(version):
    room = standard_room(version)
    room.power_levels(
        {"users": {ALICE: 100, BOB: 50}, "events": {"m.room.third_party_invite": 100}}
    )
    event = room.make("m.room.third_party_invite", BOB, {"public_key": "x"}, "tok")
    allowed(event, room)  # the events level is not consulted
    room.power_levels({"users": {ALICE: 100, BOB: 50}, "invite": 75})
    rejected(event, room, "may not invite")


@pytest.mark.parametrize("version", ALL)
def test_required_power_level(version):
    room = standard_room(version)
    room.member(CAROL, "join")
    allowed(room.make("m.room.name", BOB, {"name": "n"}, ""), room)  # state_default 50
    rejected(room.make("m.room.name", CAROL, {"name": "n"}, ""), room, "needs power level 50")
    room.power_levels(
        {"users": {ALICE: 100, BOB: 50}, "events": {"m.room.name": 0}, "events_default": 10}
    )
    allowed(room.make("m.room.name", CAROL, {"name": "n"}, ""), room)
    rejected(msg(room, CAROL), room, "needs power level 10")


@pytest.mark.parametrize("version", ALL)
def test_required_power_level_without_power_levels_event(version):
    room = Room(version)
    room.member(ALICE, "join")
    room.member(BOB, "join")
    allowed(room.make("m.room.name", ALICE, {}, ""), room)  # creator has 100 (or infinite)
    rejected(room.make("m.room.name", BOB, {}, ""), room, "needs power level 50")
    allowed(msg(room, BOB), room)


@pytest.mark.parametrize("version", ALL)
def test_state_key_of_another_user_is_rejected(version):
    room = standard_room(version)
    allowed(room.make("org.example", BOB, {}, BOB), room)
    rejected(room.make("org.example", ALICE, {}, BOB), room, "only @bob")
    allowed(room.make("org.example", BOB, {}, "bob"), room)


# --- rule 10: m.room.power_levels -----------------------------------------------------------


def pl(room: Room, sender: str, content: dict):
    """A power levels event; in room 12 alice (the creator) is left out of users."""
    users = content.get("users")
    if room.room_version.creators_have_infinite_power and isinstance(users, dict):
        content = {**content, "users": {u: v for u, v in users.items() if u != ALICE}}
    return room.make(POWER_LEVELS, sender, content, "")


@pytest.mark.parametrize("version", ALL)
def test_power_levels_users_must_be_user_ids_with_levels(version):
    room = standard_room(version)
    rejected(pl(room, ALICE, {"users": []}), room, "object")
    rejected(pl(room, ALICE, {"users": {"bob": 0}}), room, "not a user id")
    rejected(pl(room, ALICE, {"users": {BOB: "fifty"}}), room, "not an integer")
    rejected(pl(room, ALICE, {"users": {BOB: True}}), room, "not an integer")


@pytest.mark.parametrize("version", ALL)
def test_power_levels_string_values_only_before_room_10(version):
    room = standard_room(version)
    for content in (
        {"users": {BOB: " +50 "}},
        {"ban": "050"},
        {"events": {"m.room.name": "-1"}},
        {"notifications": {"room": "20"}},
    ):
        event = pl(room, ALICE, {"users": {BOB: 50}, **content})
        if get_room_version(version).enforce_int_power_levels:
            rejected(event, room, "integer")
        else:
            allowed(event, room)


@pytest.mark.parametrize("version", ["1", "9", "10"])
def test_power_levels_changed_only_when_the_integer_changes(version):
    room = standard_room(version)
    room.power_levels({"users": {ALICE: 100, BOB: "50", CAROL: 60}, "ban": "70"})
    event = pl(room, BOB, {"users": {ALICE: 100, BOB: 50, CAROL: 60}, "ban": 70})
    if version == "10":  # the state itself is invalid from room 10: "50" is no level
        rejected(event, room)
    else:
        allowed(event, room)


def test_power_levels_in_room_12_cannot_list_creators():
    room = standard_room("12", create_content={"additional_creators": [CAROL]})
    for creator in (ALICE, CAROL):
        listed = room.make(POWER_LEVELS, ALICE, {"users": {creator: 100}}, "")
        rejected(listed, room, "creator")
    allowed(pl(room, ALICE, {"users": {BOB: 100}}), room)


@pytest.mark.parametrize("version", ALL)
def test_power_levels_first_event_is_allowed(version):
    room = Room(version)
    room.member(ALICE, "join")
    allowed(pl(room, ALICE, {"users": {BOB: 1000}, "ban": 1000}), room)


@pytest.mark.parametrize("version", ALL)
def test_power_levels_named_levels(version):
    room = standard_room(version)
    room.power_levels({"users": {ALICE: 100, BOB: 50}, "kick": 75, "state_default": 50})
    base = {"users": {ALICE: 100, BOB: 50}, "kick": 75, "state_default": 50}
    rejected(pl(room, BOB, {**base, "kick": 50}), room, "cannot change kick")  # current > own
    rejected(pl(room, BOB, {**base, "ban": 51}), room, "cannot set ban")  # new > own
    allowed(pl(room, BOB, {**base, "ban": 50}), room)  # new == own
    rejected(pl(room, BOB, {"users": base["users"], "state_default": 50}), room, "kick")  # removed


@pytest.mark.parametrize("version", ALL)
def test_power_levels_events_and_notifications(version):
    room = standard_room(version)
    base = {
        "users": {ALICE: 100, BOB: 50},
        "events": {"m.room.name": 75},
        "notifications": {"room": 75},
    }
    room.power_levels(base)
    rejected(pl(room, BOB, {**base, "events": {}}), room, "events")
    rejected(
        pl(room, BOB, {**base, "events": {"m.room.name": 75, "m.room.topic": 60}}), room, "events"
    )
    allowed(pl(room, BOB, {**base, "events": {"m.room.name": 75, "m.room.topic": 50}}), room)
    change_notifications = pl(room, BOB, {**base, "notifications": {"room": 0}})
    if get_room_version(version).limit_notifications_power_levels:
        rejected(change_notifications, room, "notifications")
    else:
        allowed(change_notifications, room)


@pytest.mark.parametrize("version", ALL)
def test_power_levels_users(version):
    room = standard_room(version)
    room.member(CAROL, "join")
    users = {ALICE: 100, BOB: 50, CAROL: 50, DAVE: 10}
    room.power_levels({"users": users})
    rejected(pl(room, BOB, {"users": {**users, CAROL: 0}}), room, "@carol")  # peer, equal level
    allowed(pl(room, BOB, {"users": {**users, DAVE: 0}}), room)  # below
    allowed(pl(room, BOB, {"users": {**users, DAVE: 50}}), room)  # up to own level
    rejected(pl(room, BOB, {"users": {**users, DAVE: 51}}), room, "above")
    allowed(pl(room, BOB, {"users": {**users, BOB: 0}}), room)  # demoting oneself
    rejected(pl(room, BOB, {"users": {**users, BOB: 51}}), room, "above")
    removed = {k: v for k, v in users.items() if k != ALICE}
    if version != "12":  # in room 12 alice is a creator, never listed
        rejected(pl(room, BOB, {"users": removed}), room, "@alice")


# --- rooms 1-2 rule 11: redactions ----------------------------------------------------------


@pytest.mark.parametrize("version", ALL)
def test_redaction_of_another_server_needs_redact_level_in_rooms_1_and_2(version):
    room = standard_room(version)
    room.member(CAROL, "join")
    for redacts in ("$theirs:b.example", "$ours:a.example"):
        content = {"redacts": redacts} if version in ("11", "12") else {}
        redaction = room.make("m.room.redaction", BOB, content, extra={"redacts": redacts})
        if get_room_version(version).event_id_in_pdu and redacts.endswith("b.example"):
            room.power_levels({"users": {ALICE: 100, BOB: 50}, "redact": 51})
            rejected(redaction, room, "redact")
            room.power_levels({"users": {ALICE: 100, BOB: 50}, "redact": 50})
        allowed(redaction, room)  # from room 3 the redact level is checked on redaction


# --- room 12: creators ------------------------------------------------------------------------


def test_creators_have_infinite_power_in_room_12():
    room = standard_room("12", create_content={"additional_creators": [CAROL]})
    room.member(CAROL, "join")
    room.power_levels({"users": {BOB: 2**53 - 1}})
    rejected(room.make_member(BOB, ALICE, "ban"), room, "may not ban")
    rejected(room.make_member(BOB, CAROL, "leave"), room, "may not kick")
    allowed(room.make_member(CAROL, BOB, "ban"), room)
    rejected(room.make_member(CAROL, ALICE, "ban"), room, "may not ban")  # equal: infinite
    assert get_user_power_level(CAROL, room.state) == CREATOR_POWER_LEVEL
    assert get_user_power_level(DAVE, room.state) == 0


# --- helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL)
def test_get_user_power_level_without_power_levels(version):
    room = Room(version)
    creator_level = CREATOR_POWER_LEVEL if version == "12" else 100
    assert get_user_power_level(ALICE, room.state) == creator_level
    assert get_user_power_level(BOB, room.state) == 0


def test_get_creators_per_version():
    assert get_creators(Room("10", create_content={"creator": BOB}).create) == {BOB}
    assert get_creators(Room("11", create_content={"creator": BOB}).create) == {ALICE}
    room = Room("12", create_content={"additional_creators": [BOB, CAROL]})
    assert get_creators(room.create) == {ALICE, BOB, CAROL}


def test_required_and_named_power_levels():
    room = standard_room("9")
    room.power_levels({"events": {"m.room.name": "20"}, "state_default": 40, "ban": " 70 "})
    levels = room.state[(POWER_LEVELS, "")]
    assert get_required_power_level("m.room.name", "", levels) == 20
    assert get_required_power_level("m.room.topic", "", levels) == 40
    assert get_required_power_level("m.room.message", None, levels) == 0
    assert get_required_power_level("m.room.topic", "", None) == 50
    assert get_named_power_level("ban", levels) == 70
    assert get_named_power_level("kick", levels) == 50
    assert get_named_power_level("invite", None) == 0


@pytest.mark.parametrize(
    ("value", "version", "expected"),
    [
        (50, "10", 50),
        ("50", "10", None),
        (True, "1", None),
        ("  -050 ", "9", -50),
        ("+7", "9", 7),
        ("1_000", "9", None),
        ("٥", "9", None),
        ("5.0", "9", None),
        (51146.98, "5", 51146),  # v1-floaty-power-levels.md: truncated
        (-0.5, "1", 0),
        (50.5, "6", None),  # room 6+ events cannot hold floats
        (float("inf"), "1", None),
    ],
)
def test_parse_power_level(value, version, expected):
    assert parse_power_level(value, get_room_version(version)) == expected
