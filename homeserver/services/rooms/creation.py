"""POST /createRoom: the events of a new room, in the spec's order.

Presets and the room kinds people expect (see docs/rooms.md):
- direct message: trusted_private_chat + is_direct + one invitee; this server
  refuses any further invite into it;
- group: private_chat; everyone may post and invite (invite level 0);
- channel: events_default 50 through power_level_content_override; only
  admins (and users they raise to 50) post, everyone may read.
"""

import secrets
import string
from typing import Any

from homeserver.core.events import CREATE, MEMBER, POWER_LEVELS
from homeserver.core.room_versions import (
    KNOWN_ROOM_VERSIONS,
    RoomVersion,
    get_room_version,
)
from homeserver.errors import MatrixError
from homeserver.services.rooms.state import RoomState
from storage.events import EventToPersist

PRESETS: dict[str, dict[str, Any]] = {
    "private_chat": {"join_rule": "invite", "history_visibility": "shared",
                     "guest_access": "can_join", "invitees_are_admins": False},
    "trusted_private_chat": {"join_rule": "invite", "history_visibility": "shared",
                             "guest_access": "can_join", "invitees_are_admins": True},
    "public_chat": {"join_rule": "public", "history_visibility": "shared",
                    "guest_access": "forbidden", "invitees_are_admins": False},
}

ROOM_KIND_DM = "dm"


def default_power_levels(
    version: RoomVersion, creator: str, preset: str, invitees: list[str]
) -> dict[str, Any]:
    """Synapse-compatible defaults, adjusted by the preset."""
    users: dict[str, int] = {}
    if not version.creators_have_infinite_power:
        users[creator] = 100  # room 12 creators outrank everyone and are not listed
    if PRESETS[preset]["invitees_are_admins"]:
        for user_id in invitees:
            users[user_id] = 100
    return {
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 150 if version.creators_have_infinite_power else 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 0 if preset != "public_chat" else 50,
        "historical": 100,
        "notifications": {"room": 50},
    }


def _random_room_id(server_name: str) -> str:
    alphabet = string.ascii_letters
    return "!" + "".join(secrets.choice(alphabet) for _ in range(18)) + ":" + server_name


class RoomCreator:
    def __init__(self, hs: Any) -> None:
        self.hs = hs

    def _room_version(self, requested: Any) -> RoomVersion:
        identifier = requested if requested is not None else self.hs.config["default_room_version"]
        if identifier not in KNOWN_ROOM_VERSIONS:
            raise MatrixError(
                "M_UNSUPPORTED_ROOM_VERSION", f"This server does not support room version {identifier}"
            )
        return get_room_version(identifier)

    async def create_room(self, creator: str, body: dict[str, Any], device_id: str | None = None) -> str:
        """Create a room from a /createRoom body; returns the room id once durable."""
        hs = self.hs
        version = self._room_version(body.get("room_version"))
        visibility = body.get("visibility", "private")
        preset = body.get("preset") or ("public_chat" if visibility == "public" else "private_chat")
        invitees: list[str] = list(dict.fromkeys(body.get("invite", [])))
        is_direct = bool(body.get("is_direct", False))

        alias = None
        if body.get("room_alias_name") is not None:
            alias = f"#{body['room_alias_name']}:{hs.server_name}"
            await hs.directory.check_alias_available(alias, creator)

        creation_content = dict(body.get("creation_content") or {})
        creation_content.pop("room_version", None)
        creation_content["room_version"] = version.identifier
        if not version.implicit_room_creator:
            creation_content["creator"] = creator
        else:
            creation_content.pop("creator", None)
        if "additional_creators" in creation_content and not version.additional_creators:
            raise MatrixError("M_BAD_JSON", "additional_creators needs room version 12 or later")

        room_id = None if version.room_id_is_create_event_hash else _random_room_id(hs.server_name)
        sender = hs.room_sender
        room, create_item = sender.build_create_event(version, creator, creation_content, room_id)
        items: list[EventToPersist] = [create_item]

        def add(event_type: str, content: dict[str, Any], state_key: str | None = "") -> None:
            items.append(sender.build(room, creator, event_type, content, state_key,
                                      device_id=device_id))

        profile = await hs.profiles.get_local_profile(creator)
        add(MEMBER, {"membership": "join", **profile}, creator)

        power_levels = default_power_levels(version, creator, preset, invitees)
        for key, value in (body.get("power_level_content_override") or {}).items():
            power_levels[key] = value
        if version.creators_have_infinite_power:
            creators = {creator, *creation_content.get("additional_creators", [])}
            users = power_levels.get("users")
            if isinstance(users, dict):
                power_levels["users"] = {u: v for u, v in users.items() if u not in creators}
        add(POWER_LEVELS, power_levels)

        if alias is not None:
            add("m.room.canonical_alias", {"alias": alias})
        preset_info = PRESETS[preset]
        initial = {(e["type"], e.get("state_key", "")): e for e in body.get("initial_state", [])}
        for event_type, key, value in (
            ("m.room.join_rules", "join_rule", preset_info["join_rule"]),
            ("m.room.history_visibility", "history_visibility", preset_info["history_visibility"]),
            ("m.room.guest_access", "guest_access", preset_info["guest_access"]),
        ):
            if (event_type, "") not in initial:
                add(event_type, {key: value})
        for (event_type, state_key), event in initial.items():
            if event_type in (CREATE, MEMBER, POWER_LEVELS):
                raise MatrixError("M_BAD_JSON", f"initial_state may not contain {event_type}")
            add(event_type, event.get("content", {}), state_key)
        if body.get("name") is not None:
            add("m.room.name", {"name": body["name"]})
        if body.get("topic") is not None:
            add("m.room.topic", {
                "topic": body["topic"],
                "m.topic": {"m.text": [{"mimetype": "text/plain", "body": body["topic"]}]},
            })
        for invitee in invitees:
            invitee_profile = await hs.profiles.get_local_profile(invitee)
            content = {"membership": "invite", **invitee_profile}
            if is_direct:
                content["is_direct"] = True
            add(MEMBER, content, invitee)

        kind = ROOM_KIND_DM if is_direct and preset == "trusted_private_chat" else None
        room.kind = create_item.room_kind = kind
        hs.room_states.add(room)
        try:
            for item in items[:-1]:
                hs.persister.persist(item).addErrback(lambda _: None)
            await hs.persister.persist(items[-1])
        except BaseException:
            hs.room_states.invalidate(room.room_id)
            raise
        if alias is not None:
            await hs.directory.create_alias(alias, room.room_id, creator, check_power=False)
        if visibility == "public":
            await hs.directory.set_room_visibility(room.room_id, "public", creator, check_power=False)
        return room.room_id


__all__ = ["RoomCreator", "RoomState", "default_power_levels"]
