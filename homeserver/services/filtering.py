"""Sync and /messages filters (spec "Filtering"): which events a client wants."""

import fnmatch
import re
from functools import lru_cache
from typing import Any

import attrs

from homeserver.core.events import Pdu

DEFAULT_TIMELINE_LIMIT = 10


@lru_cache(maxsize=1024)
def _type_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def _matches_any(value: str, patterns: list[str]) -> bool:
    return any(p == value or ("*" in p and _type_pattern(p).match(value)) for p in patterns)


@attrs.frozen
class EventFilter:
    """EventFilter / RoomEventFilter / StateFilter of the spec."""

    limit: int | None = None
    types: list[str] | None = None
    not_types: list[str] = attrs.field(factory=list)
    senders: list[str] | None = None
    not_senders: list[str] = attrs.field(factory=list)
    rooms: list[str] | None = None
    not_rooms: list[str] = attrs.field(factory=list)
    contains_url: bool | None = None
    lazy_load_members: bool = False
    include_redundant_members: bool = False
    unread_thread_notifications: bool = False

    @classmethod
    def from_json(cls, data: Any) -> "EventFilter":
        if not isinstance(data, dict):
            return cls()
        keys = attrs.fields_dict(cls)
        return cls(**{k: v for k, v in data.items() if k in keys})

    def allows_room(self, room_id: str) -> bool:
        if room_id in self.not_rooms:
            return False
        return self.rooms is None or room_id in self.rooms

    def allows(self, event: Pdu | dict[str, Any]) -> bool:
        if isinstance(event, Pdu):
            event_type, sender, content = event.type, event.sender, event.content
        else:
            event_type, sender = event.get("type", ""), event.get("sender", "")
            content = event.get("content", {})
        if self.not_types and _matches_any(event_type, self.not_types):
            return False
        if self.types is not None and not _matches_any(event_type, self.types):
            return False
        if sender in self.not_senders:
            return False
        if self.senders is not None and sender not in self.senders:
            return False
        if self.contains_url is not None:
            has_url = isinstance(content, dict) and isinstance(content.get("url"), str)
            if has_url != self.contains_url:
                return False
        return True

    def filter(self, events: list[Any]) -> list[Any]:
        return [e for e in events if self.allows(e)]


@attrs.frozen
class SyncFilter:
    """A whole filter: what /sync returns."""

    timeline: EventFilter = EventFilter()
    state: EventFilter = EventFilter()
    ephemeral: EventFilter = EventFilter()
    room_account_data: EventFilter = EventFilter()
    account_data: EventFilter = EventFilter()
    presence: EventFilter = EventFilter()
    rooms: list[str] | None = None
    not_rooms: list[str] = attrs.field(factory=list)
    include_leave: bool = False
    event_fields: list[str] | None = None
    event_format: str = "client"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SyncFilter":
        room = data.get("room") or {}
        return cls(
            timeline=EventFilter.from_json(room.get("timeline")),
            state=EventFilter.from_json(room.get("state")),
            ephemeral=EventFilter.from_json(room.get("ephemeral")),
            room_account_data=EventFilter.from_json(room.get("account_data")),
            account_data=EventFilter.from_json(data.get("account_data")),
            presence=EventFilter.from_json(data.get("presence")),
            rooms=room.get("rooms"),
            not_rooms=room.get("not_rooms") or [],
            include_leave=bool(room.get("include_leave", False)),
            event_fields=data.get("event_fields"),
            event_format=data.get("event_format", "client"),
        )

    def allows_room(self, room_id: str) -> bool:
        if room_id in self.not_rooms:
            return False
        return self.rooms is None or room_id in self.rooms

    @property
    def timeline_limit(self) -> int:
        limit = self.timeline.limit
        return DEFAULT_TIMELINE_LIMIT if limit is None else max(0, min(limit, 1000))


def apply_event_fields(event: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    """Keep only the dotted ``event_fields`` of a serialized event."""
    if not fields:
        return event
    result: dict[str, Any] = {}
    for field in fields:
        parts = re.split(r"(?<!\\)\.", field)
        parts = [p.replace("\\.", ".") for p in parts]
        source: Any = event
        for part in parts:
            if not isinstance(source, dict) or part not in source:
                break
            source = source[part]
        else:
            target = result
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = source
    return result
