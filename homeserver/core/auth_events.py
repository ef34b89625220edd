"""Which state events a new event cites as ``auth_events``.

Spec: server-server "Auth events selection". The same list is what auth rule
"entries whose type and state_key don't match the auth events selection"
compares against, so ``auth_state_keys`` is shared with the auth rules.
"""

from collections.abc import Mapping
from typing import Any

from homeserver.core.events import (
    CREATE,
    JOIN_RULES,
    MEMBER,
    POWER_LEVELS,
    THIRD_PARTY_INVITE,
    Pdu,
    StateKey,
)
from homeserver.core.room_versions import RoomVersion

AUTHORISING_USER = "join_authorised_via_users_server"


def auth_state_keys(
    room_version: RoomVersion,
    event_type: str,
    sender: str,
    state_key: str | None,
    content: Mapping[str, Any],
) -> list[StateKey]:
    """The (type, state_key) pairs an event may cite, in a stable order.

    The create event cites nothing. Room 12 never cites the create event: the
    room id already names it. Malformed content (a non-string token, say)
    simply selects nothing for that entry; the auth rules reject it later.
    """
    if event_type == CREATE:
        return []
    keys: list[StateKey] = []
    if room_version.create_event_in_auth_events:
        keys.append((CREATE, ""))
    keys.append((POWER_LEVELS, ""))
    keys.append((MEMBER, sender))
    if event_type == MEMBER and isinstance(state_key, str):
        membership = content.get("membership")
        keys.append((MEMBER, state_key))
        if membership in ("join", "invite", "knock"):
            keys.append((JOIN_RULES, ""))
        if membership == "invite" and "third_party_invite" in content:
            invite = content["third_party_invite"]
            signed = invite.get("signed") if isinstance(invite, Mapping) else None
            token = signed.get("token") if isinstance(signed, Mapping) else None
            if isinstance(token, str):
                keys.append((THIRD_PARTY_INVITE, token))
        if room_version.restricted_join_rule and membership == "join":
            authoriser = content.get(AUTHORISING_USER)
            if isinstance(authoriser, str):
                keys.append((MEMBER, authoriser))
    # Drop repeats (sender == target, authoriser == sender) keeping order.
    return list(dict.fromkeys(keys))


def auth_state_keys_for_pdu(pdu: Pdu) -> list[StateKey]:
    return auth_state_keys(pdu.room_version, pdu.type, pdu.sender, pdu.state_key, pdu.content)


def select_auth_events(
    room_version: RoomVersion,
    event_type: str,
    sender: str,
    state_key: str | None,
    content: Mapping[str, Any],
    current_state: Mapping[StateKey, str],
) -> list[str]:
    """Event ids to put in ``auth_events``: the selected entries present in
    ``current_state`` ((type, state_key) -> event id)."""
    ids = []
    for key in auth_state_keys(room_version, event_type, sender, state_key, content):
        event_id = current_state.get(key)
        if event_id is not None and event_id not in ids:
            ids.append(event_id)
    return ids
