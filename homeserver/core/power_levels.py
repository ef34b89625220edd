"""Reading power levels as the authorisation rules define them.

Power-level content is read lazily, one key at a time: an auth check touches
two or three values, so parsing the whole event up front would cost more than
it saves. Values are integers from room 10; before that they may also be
strings of an integer (rooms 1-9) or floats (rooms 1-5), see the spec's
"m.room.power_levels events accept values as strings/floats" sections.
"""

import math
import re
from collections.abc import Mapping
from typing import Any

from homeserver.core.events import CREATE, POWER_LEVELS, Pdu
from homeserver.core.room_versions import RoomVersion

CREATE_KEY = (CREATE, "")
POWER_LEVELS_KEY = (POWER_LEVELS, "")

# Room 12: creators outrank every level an m.room.power_levels event can hold
# (canonical JSON caps integers at 2**53 - 1).
CREATOR_POWER_LEVEL = 2**53

# Top-level levels and their defaults when the key (or the whole event) is absent.
NAMED_LEVEL_DEFAULTS: Mapping[str, int] = {
    "users_default": 0,
    "events_default": 0,
    "state_default": 50,
    "ban": 50,
    "kick": 50,
    "redact": 50,
    "invite": 0,
}

# "a single base 10 integer ... optionally prefixed with - or + ... optionally
# with any number of leading or trailing whitespace characters".
_STRINGY_INT = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
_SERVER_NAME = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,255})(?::[0-9]{1,5})?")


def parse_power_level(value: Any, room_version: RoomVersion) -> int | None:
    """The integer a power-level value stands for, or None if it is not one."""
    if type(value) is int:  # bool is not a power level
        return value
    if room_version.enforce_int_power_levels:
        return None
    if type(value) is str:
        return int(value) if _STRINGY_INT.fullmatch(value) else None
    if type(value) is float and not room_version.strict_canonical_json and math.isfinite(value):
        return int(value)  # truncated at the decimal point
    return None


def is_valid_user_id(user_id: Any) -> bool:
    """ "@localpart:server_name" within 255 bytes; the localpart is not checked
    beyond being present, since historical user ids allow almost anything."""
    if type(user_id) is not str or not user_id.startswith("@"):
        return False
    localpart, sep, server_name = user_id[1:].partition(":")
    return (
        bool(sep)
        and bool(localpart)
        and len(user_id.encode()) <= 255
        and _SERVER_NAME.fullmatch(server_name) is not None
    )


def domain_of(matrix_id: str) -> str:
    """The server name of a user, room or (rooms 1-2) event id."""
    return matrix_id.partition(":")[2]


def get_creators(create_event: Pdu) -> frozenset[str]:
    """The room's creators: content.creator before room 11, the create event's
    sender from room 11, plus content.additional_creators from room 12."""
    room_version = create_event.room_version
    if not room_version.implicit_room_creator:
        creator = create_event.content.get("creator")
        return frozenset((creator,)) if type(creator) is str else frozenset()
    creators = {create_event.sender}
    if room_version.additional_creators:
        extra = create_event.content.get("additional_creators")
        if type(extra) is list:
            creators.update(u for u in extra if type(u) is str)
    return frozenset(creators)


def is_creator(create_event: Pdu, user_id: str) -> bool:
    if not create_event.room_version.implicit_room_creator:
        return create_event.content.get("creator") == user_id
    if create_event.sender == user_id:
        return True
    if create_event.room_version.additional_creators:
        extra = create_event.content.get("additional_creators")
        return type(extra) is list and user_id in extra
    return False


class PowerLevels:
    """The power levels in force: the m.room.power_levels event (if any) read
    together with the create event, which decides who the creators are."""

    __slots__ = ("content", "create_event", "room_version", "exists")

    def __init__(self, power_levels_event: Pdu | None, create_event: Pdu) -> None:
        self.create_event = create_event
        self.room_version = create_event.room_version
        self.exists = power_levels_event is not None
        self.content: Mapping[str, Any] = (
            power_levels_event.data.get("content", {}) if power_levels_event is not None else {}
        )

    @classmethod
    def from_state(cls, auth_events: Mapping[tuple[str, str], Pdu]) -> "PowerLevels":
        create_event = auth_events.get(CREATE_KEY)
        if create_event is None:
            raise ValueError("power levels need the room's m.room.create event")
        return cls(auth_events.get(POWER_LEVELS_KEY), create_event)

    def named(self, name: str) -> int:
        """users_default, events_default, state_default, ban, kick, redact or invite."""
        value = self.content.get(name)
        if type(value) is int:
            return value
        level = parse_power_level(value, self.room_version)
        return NAMED_LEVEL_DEFAULTS[name] if level is None else level

    def user_level(self, user_id: str) -> int:
        if self.room_version.creators_have_infinite_power and is_creator(
            self.create_event, user_id
        ):
            return CREATOR_POWER_LEVEL
        if not self.exists:
            # No power levels event: the creator has 100 (rooms 1-11), others 0.
            return 100 if is_creator(self.create_event, user_id) else 0
        users = self.content.get("users")
        if type(users) is dict and user_id in users:
            value = users[user_id]
            if type(value) is int:
                return value
            level = parse_power_level(value, self.room_version)
            if level is not None:
                return level
        return self.named("users_default")

    def required_level(self, event_type: str, is_state: bool) -> int:
        """The spec's "required power level" to send an event of this type."""
        events = self.content.get("events")
        if type(events) is dict and event_type in events:
            value = events[event_type]
            if type(value) is int:
                return value
            level = parse_power_level(value, self.room_version)
            if level is not None:
                return level
        return self.named("state_default" if is_state else "events_default")


def get_user_power_level(user_id: str, auth_events: Mapping[tuple[str, str], Pdu]) -> int:
    """A user's power level in the given state (which must hold the create event)."""
    return PowerLevels.from_state(auth_events).user_level(user_id)


def get_required_power_level(
    event_type: str, state_key: str | None, power_levels: Pdu | None
) -> int:
    """The level needed to send an event of ``event_type`` (a state event when
    ``state_key`` is not None) under the ``power_levels`` event, if any."""
    content = power_levels.content if power_levels is not None else {}
    room_version = power_levels.room_version if power_levels is not None else None
    events = content.get("events")
    if type(events) is dict and event_type in events and room_version is not None:
        level = parse_power_level(events[event_type], room_version)
        if level is not None:
            return level
    return get_named_power_level(
        "state_default" if state_key is not None else "events_default", power_levels
    )


def get_named_power_level(name: str, power_levels: Pdu | None) -> int:
    """ban, kick, redact, invite, users_default, events_default or state_default."""
    if power_levels is None:
        return NAMED_LEVEL_DEFAULTS[name]
    level = parse_power_level(power_levels.content.get(name), power_levels.room_version)
    return NAMED_LEVEL_DEFAULTS[name] if level is None else level


# --- rule 10: changing the power levels -------------------------------------------

_LEVEL_MAPS = ("events", "notifications")


def _content_problem(content: Mapping[str, Any], room_version: RoomVersion) -> str | None:
    """Rules 10.1-10.3 (rule 9.1 before room 10): the new content's shape."""
    if room_version.enforce_int_power_levels:
        for name in NAMED_LEVEL_DEFAULTS:
            if name in content and type(content[name]) is not int:
                return f"{name} must be an integer"
        for name in _LEVEL_MAPS:
            if name in content:
                levels = content[name]
                if type(levels) is not dict or any(type(v) is not int for v in levels.values()):
                    return f"{name} must map to integers"
    users = content.get("users", {})
    if type(users) is not dict:
        return "users must be an object"
    for user_id, level in users.items():
        if not is_valid_user_id(user_id):
            return f"{user_id!r} in users is not a user id"
        if parse_power_level(level, room_version) is None:
            return f"the power level of {user_id} is not an integer"
    return None


def _level_map(content: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    levels = content.get(name)
    return levels if type(levels) is dict else {}


def power_levels_change_problem(
    event: Pdu, previous: Pdu | None, create_event: Pdu, sender_level: int
) -> str | None:
    """Why the m.room.power_levels ``event`` may not replace ``previous``
    (None if it may): rule 10 of room 12, rule 9 of rooms 1-11."""
    room_version = event.room_version
    new = event.content
    problem = _content_problem(new, room_version)
    if problem is not None:
        return problem
    users = new.get("users", {})
    if room_version.creators_have_infinite_power:
        for creator in get_creators(create_event):
            if creator in users:
                return f"the room creator {creator} cannot be given a power level"
    if previous is None:
        return None
    old = previous.content
    sender = event.sender

    def parse(levels: Mapping[str, Any], key: str) -> int | None:
        return parse_power_level(levels[key], room_version) if key in levels else None

    def changed(old_map: Mapping[str, Any], new_map: Mapping[str, Any], key: str) -> bool:
        if key in old_map and key in new_map:
            old_raw, new_raw = old_map[key], new_map[key]
            if type(old_raw) is type(new_raw) and old_raw == new_raw:
                return False  # untouched, even if it is not a valid level
            old_value = parse_power_level(old_raw, room_version)
            return old_value is None or old_value != parse_power_level(new_raw, room_version)
        return key in old_map or key in new_map

    for name in NAMED_LEVEL_DEFAULTS:
        if changed(old, new, name):
            problem = _too_high(parse(old, name), parse(new, name), new, name, sender_level)
            if problem:
                return problem
    maps = _LEVEL_MAPS if room_version.limit_notifications_power_levels else _LEVEL_MAPS[:1]
    for map_name in maps:
        old_map, new_map = _level_map(old, map_name), _level_map(new, map_name)
        for key in old_map.keys() | new_map.keys():
            if changed(old_map, new_map, key):
                problem = _too_high(
                    parse(old_map, key), parse(new_map, key), new_map, key, sender_level
                )
                if problem:
                    return f"{map_name}: {problem}"
    old_users = _level_map(old, "users")
    for user_id in old_users.keys() | users.keys():
        if not changed(old_users, users, user_id):
            continue
        old_level = parse(old_users, user_id)
        if user_id != sender and old_level is not None and old_level >= sender_level:
            return f"cannot change the power level of {user_id}, who is not below the sender"
        new_level = parse(users, user_id)
        if new_level is not None and new_level > sender_level:
            return f"cannot give {user_id} a power level above the sender's"
    return None


def _too_high(
    old_level: int | None, new_level: int | None, new: Mapping[str, Any], key: str, limit: int
) -> str | None:
    if old_level is not None and old_level > limit:
        return f"cannot change {key}, which is above the sender's power level"
    if key in new and new_level is None:
        return f"{key} is not a valid power level"
    if new_level is not None and new_level > limit:
        return f"cannot set {key} above the sender's power level"
    return None
