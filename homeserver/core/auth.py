"""The authorisation rules for PDUs, for every room version.

Two entry points, mirroring the two halves of the spec's rules:

* ``check_auth_events_are_valid`` - the rules about the event's own
  ``auth_events`` list (types, duplicates, room, create event presence). They
  do not depend on room state, so run them once when an event arrives.
* ``check_auth_rules`` - every other rule, checked against a state map
  (the event's auth events, or the room state before it). State resolution
  calls this for each event it replays.

Rule numbers in comments are those of room version 12 (server-server API /
rooms/v12 "Authorisation rules"); older versions differ only where a room
version flag says so. Signatures on the event itself are verified elsewhere
(see ``signatures.py``); the only signatures checked here are those of a third
party invite's ``signed`` block, which the rules themselves require.
"""

from collections.abc import Container, Mapping
from typing import Any

from nacl.signing import VerifyKey

from crypto.b64 import decode_base64
from crypto.signing import SignatureError, verify_signature
from homeserver.core.auth_events import AUTHORISING_USER, auth_state_keys_for_pdu
from homeserver.core.events import (
    ALIASES,
    CREATE,
    JOIN_RULES,
    MEMBER,
    POWER_LEVELS,
    REDACTION,
    THIRD_PARTY_INVITE,
    Pdu,
)
from homeserver.core.power_levels import (
    CREATE_KEY,
    POWER_LEVELS_KEY,
    PowerLevels,
    domain_of,
    get_creators,
    get_named_power_level,
    get_required_power_level,
    get_user_power_level,
    is_valid_user_id,
    power_levels_change_problem,
)
from homeserver.core.room_versions import KNOWN_ROOM_VERSIONS

__all__ = [
    "AuthError",
    "check_auth_events_are_valid",
    "check_auth_rules",
    "get_creators",
    "get_named_power_level",
    "get_required_power_level",
    "get_user_power_level",
]

StateMap = Mapping[tuple[str, str], Pdu]

JOIN_RULES_KEY = (JOIN_RULES, "")


class AuthError(Exception):
    """An event fails the authorisation rules; str(e) is the human-readable reason."""


# --- auth events (rule 3; rule 2 before room 12) ----------------------------------


def check_auth_events_are_valid(
    event: Pdu,
    auth_events_by_id: Mapping[str, Pdu],
    rejected_event_ids: Container[str] = frozenset(),
) -> None:
    """Rule 3 (rule 2 before room 12): the event's cited ``auth_events``.

    ``auth_events_by_id`` must hold every cited event; ``rejected_event_ids``
    names those that were themselves rejected. In room 12 the create event
    must not be cited (the room id stands for it); before, it must be.
    Room 12's rule 2 (the room id names an accepted create event) is checked
    by ``check_auth_rules`` against the create event in the state it is given.
    """
    if event.type == CREATE:
        return
    expected = frozenset(auth_state_keys_for_pdu(event))
    seen: dict[tuple[str, str], str] = {}
    for event_id in event.auth_event_ids:
        auth_event = auth_events_by_id.get(event_id)
        if auth_event is None:
            raise AuthError(f"auth event {event_id} is unknown")
        if auth_event.room_id != event.room_id:
            raise AuthError(f"auth event {event_id} belongs to another room")
        key = (auth_event.type, auth_event.state_key)
        if key in seen:
            raise AuthError(f"auth events {seen[key]} and {event_id} are both for {key}")
        if key not in expected:
            raise AuthError(f"auth event {event_id} for {key} is not needed to authorise this")
        if event_id in rejected_event_ids:
            raise AuthError(f"auth event {event_id} was rejected")
        seen[key] = event_id
    if event.room_version.create_event_in_auth_events and CREATE_KEY not in seen:
        raise AuthError("the m.room.create event is missing from auth_events")


# --- the rules ------------------------------------------------------------------


def check_auth_rules(event: Pdu, auth_events: StateMap) -> None:
    """Raise AuthError unless ``event`` passes the auth rules against ``auth_events``,
    a (type, state_key) -> event map of the state it is checked against.

    For room 12 the map must include the create event even though events do
    not cite it.
    """
    room_version = event.room_version
    data = event.data
    event_type = data["type"]
    if event_type == CREATE:
        _check_create(event)  # rule 1
        return

    create = auth_events.get(CREATE_KEY)
    if create is None:
        raise AuthError("the room's m.room.create event is missing")
    # Rule 2 (room 12: the room id is the create event's id) and, for earlier
    # versions, the room check of rule 3.5 applied to the state given.
    if create.room_id != data.get("room_id"):
        raise AuthError("the m.room.create event is for another room")

    # Rule 4: m.federate
    sender = data["sender"]
    if create.content.get("m.federate") is False and domain_of(sender) != domain_of(create.sender):
        raise AuthError("this room does not federate with the sender's server")

    if event_type == ALIASES and room_version.special_case_aliases_auth:
        _check_aliases(event)  # rule 4 of rooms 1-5
        return

    power = PowerLevels(auth_events.get(POWER_LEVELS_KEY), create)
    if event_type == MEMBER:
        _check_membership(event, auth_events, create, power)  # rule 5
        return

    # Rule 6
    if _membership_of(auth_events, sender) != "join":
        raise AuthError(f"{sender} is not in the room")

    sender_level = power.user_level(sender)
    if event_type == THIRD_PARTY_INVITE:  # rule 7
        if sender_level < power.named("invite"):
            raise AuthError(f"{sender} may not invite users to this room")
        return

    # Rule 8
    is_state = event.is_state
    required = power.required_level(event_type, is_state)
    if sender_level < required:
        raise AuthError(f"{event_type} needs power level {required}; {sender} has {sender_level}")

    # Rule 9
    state_key = event.state_key
    if is_state and state_key.startswith("@") and state_key != sender:
        raise AuthError(f"only {state_key} may set state with their user id as state key")

    if event_type == POWER_LEVELS:
        _check_power_levels(event, auth_events, create, sender_level)  # rule 10
    elif event_type == REDACTION and room_version.event_id_in_pdu:
        _check_redaction_v1(event, power, sender_level)  # rule 11 of rooms 1-2


def _check_create(event: Pdu) -> None:
    room_version = event.room_version
    if event.prev_event_ids or event.data.get("prev_events"):
        raise AuthError("an m.room.create event may not have prev_events")
    if room_version.room_id_is_create_event_hash:
        if "room_id" in event.data:
            raise AuthError("an m.room.create event in this room version has no room_id")
    elif domain_of(event.room_id) != domain_of(event.sender):
        raise AuthError("the room id's server does not match the creator's")
    content = event.content
    if "room_version" in content and not (
        type(content["room_version"]) is str and content["room_version"] in KNOWN_ROOM_VERSIONS
    ):
        raise AuthError(f"unknown room version {content['room_version']!r}")
    if not room_version.implicit_room_creator and "creator" not in content:
        raise AuthError("the m.room.create event has no creator")
    if room_version.additional_creators and "additional_creators" in content:
        extra = content["additional_creators"]
        if type(extra) is not list or not all(is_valid_user_id(u) for u in extra):
            raise AuthError("additional_creators must be a list of user ids")


def _check_aliases(event: Pdu) -> None:
    if event.state_key is None:
        raise AuthError("m.room.aliases must be a state event")
    if event.state_key != domain_of(event.sender):
        raise AuthError("m.room.aliases state_key must be the sender's server name")


def _membership_of(auth_events: StateMap, user_id: str) -> str | None:
    member = auth_events.get((MEMBER, user_id))
    return None if member is None else member.content.get("membership")


def _join_rule(auth_events: StateMap) -> Any:
    # The spec gives no default; with no join rules event a room is invite-only
    # (so joins need an invite), which is also what Synapse assumes.
    join_rules = auth_events.get(JOIN_RULES_KEY)
    return "invite" if join_rules is None else join_rules.content.get("join_rule", "invite")


def _check_membership(event: Pdu, auth_events: StateMap, create: Pdu, power: PowerLevels) -> None:
    room_version = event.room_version
    content = event.content
    target = event.state_key
    membership = content.get("membership")
    if target is None or "membership" not in content:  # 5.1
        raise AuthError("a membership event needs a state_key and content.membership")
    if room_version.restricted_join_rule and AUTHORISING_USER in content:  # 5.2
        _check_authorising_server_signed(event, content[AUTHORISING_USER])

    sender = event.sender
    sender_membership = _membership_of(auth_events, sender)
    if membership == "join":
        _check_join(event, auth_events, create, power, sender_membership)
        return
    target_membership = (
        sender_membership if target == sender else _membership_of(auth_events, target)
    )
    if membership == "invite":
        if "third_party_invite" in content:  # 5.4.1
            if target_membership == "ban":
                raise AuthError(f"{target} is banned from the room")
            _check_third_party_invite(event, auth_events)
            return
        if sender_membership != "join":
            raise AuthError(f"{sender} is not in the room")
        if target_membership in ("join", "ban"):
            raise AuthError(
                f"{target} is {'in' if target_membership == 'join' else 'banned from'} the room"
            )
        if power.user_level(sender) < power.named("invite"):
            raise AuthError(f"{sender} may not invite users to this room")
    elif membership == "leave":
        if sender == target:  # 5.5.1
            if sender_membership in ("invite", "join") or (
                sender_membership == "knock" and room_version.knock_join_rule
            ):
                return
            raise AuthError(f"{sender} cannot leave a room they are not in")
        if sender_membership != "join":
            raise AuthError(f"{sender} is not in the room")
        sender_level = power.user_level(sender)
        if target_membership == "ban" and sender_level < power.named("ban"):
            raise AuthError(f"{sender} may not unban users in this room")
        if sender_level < power.named("kick") or power.user_level(target) >= sender_level:
            raise AuthError(f"{sender} may not kick {target}")
    elif membership == "ban":
        if sender_membership != "join":
            raise AuthError(f"{sender} is not in the room")
        sender_level = power.user_level(sender)
        if sender_level < power.named("ban") or power.user_level(target) >= sender_level:
            raise AuthError(f"{sender} may not ban {target}")
    elif membership == "knock" and room_version.knock_join_rule:
        join_rule = _join_rule(auth_events)
        if not (
            join_rule == "knock"
            or (join_rule == "knock_restricted" and room_version.knock_restricted_join_rule)
        ):
            raise AuthError("this room does not accept knocks")
        if sender != target:
            raise AuthError("users can only knock for themselves")
        if sender_membership in ("ban", "invite", "join"):
            raise AuthError(f"{sender} cannot knock while their membership is {sender_membership}")
    else:
        raise AuthError(f"unknown membership {membership!r}")


def _check_join(
    event: Pdu,
    auth_events: StateMap,
    create: Pdu,
    power: PowerLevels,
    sender_membership: str | None,
) -> None:
    room_version = event.room_version
    sender = event.sender
    target = event.state_key
    # 5.3.1: the creator's own join straight after the create event.
    prev_events = event.prev_event_ids
    if len(prev_events) == 1 and prev_events[0] == create.event_id:
        creator = (
            create.sender if room_version.implicit_room_creator else create.content.get("creator")
        )
        if target == creator:
            return
    if sender != target:
        raise AuthError("users can only join for themselves")
    if sender_membership == "ban":
        raise AuthError(f"{sender} is banned from the room")
    join_rule = _join_rule(auth_events)
    if join_rule == "public":
        return
    if join_rule == "invite" or (join_rule == "knock" and room_version.knock_join_rule):
        if sender_membership in ("invite", "join"):
            return
        raise AuthError(f"{sender} needs an invite to join this room")
    if (join_rule == "restricted" and room_version.restricted_join_rule) or (
        join_rule == "knock_restricted" and room_version.knock_restricted_join_rule
    ):
        if sender_membership in ("invite", "join"):
            return
        authoriser = event.content.get(AUTHORISING_USER)
        if type(authoriser) is not str or _membership_of(auth_events, authoriser) != "join":
            raise AuthError("a restricted join must be authorised by a member of the room")
        if power.user_level(authoriser) < power.named("invite"):
            raise AuthError(f"{authoriser} may not invite users, so cannot authorise joins")
        return
    raise AuthError(f"{sender} cannot join a room whose join rule is {join_rule!r}")


def _check_authorising_server_signed(event: Pdu, authoriser: Any) -> None:
    """Rule 5.2: the authorising user's server must have signed the join.

    Only the signature's presence is checked here; signatures.py verifies it
    cryptographically (the server handling send_join must add its signature
    before auth-checking the event)."""
    if type(authoriser) is not str or ":" not in authoriser:
        raise AuthError(f"{AUTHORISING_USER} is not a user id")
    if domain_of(authoriser) not in event.signatures:
        raise AuthError(f"the join is not signed by {domain_of(authoriser)}")


def _check_power_levels(event: Pdu, auth_events: StateMap, create: Pdu, sender_level: int) -> None:
    # Compared with the previous event of the same (type, state_key), as Synapse
    # does; only ("m.room.power_levels", "") confers power.
    previous = auth_events.get((event.type, event.state_key))
    problem = power_levels_change_problem(event, previous, create, sender_level)
    if problem is not None:
        raise AuthError(problem)


def _check_redaction_v1(event: Pdu, power: PowerLevels, sender_level: int) -> None:
    """Rooms 1-2, rule 11: a redaction needs the redact level unless it is for
    an event sent from the redacting event's own server."""
    if sender_level >= power.named("redact"):
        return
    redacts = event.redacts
    if type(redacts) is str and domain_of(redacts) == domain_of(event.event_id):
        return
    raise AuthError(f"{event.sender} may not redact events from other servers")


def _check_third_party_invite(event: Pdu, auth_events: StateMap) -> None:
    """Rules 5.4.1.2-8: an invite on behalf of a third-party identifier must
    carry a ``signed`` block signed with a key from the matching
    m.room.third_party_invite event, which the same sender must have sent."""
    invite = event.content["third_party_invite"]
    signed = invite.get("signed") if type(invite) is dict else None
    if type(signed) is not dict:
        raise AuthError("third_party_invite has no signed block")
    if "mxid" not in signed or "token" not in signed:
        raise AuthError("third_party_invite.signed needs mxid and token")
    if signed["mxid"] != event.state_key:
        raise AuthError("third_party_invite.signed.mxid is not the invited user")
    token = signed["token"]
    invite_event = auth_events.get((THIRD_PARTY_INVITE, token)) if type(token) is str else None
    if invite_event is None:
        raise AuthError("no m.room.third_party_invite matches the token")
    if invite_event.sender != event.sender:
        raise AuthError("the third party invite was sent by someone else")
    if not _signed_with_any(signed, _public_keys(invite_event.content)):
        raise AuthError("third_party_invite.signed has no valid signature")


def _public_keys(content: Mapping[str, Any]) -> list[VerifyKey]:
    encoded = [content.get("public_key")]
    extra = content.get("public_keys")
    if type(extra) is list:
        encoded.extend(k.get("public_key") for k in extra if type(k) is dict)
    keys = []
    for key in encoded:
        if type(key) is str:
            try:
                keys.append(VerifyKey(decode_base64(key)))
            except ValueError:  # bad base64 or not 32 bytes: no usable key
                continue
    return keys


def _signed_with_any(signed: dict[str, Any], keys: list[VerifyKey]) -> bool:
    """Whether any ed25519 signature in ``signed`` verifies with any key."""
    signatures = signed.get("signatures")
    if type(signatures) is not dict or not keys:
        return False
    for server, by_key_id in signatures.items():
        if type(by_key_id) is not dict:
            continue
        for key_id in by_key_id:
            if not key_id.startswith("ed25519:"):
                continue
            for key in keys:
                try:
                    verify_signature(signed, server, key_id, key)
                    return True
                except SignatureError:
                    continue
    return False
