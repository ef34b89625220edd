"""What state resolution needs from its caller: events by id, and which are rejected.

Resolution is synchronous and pure, so the caller fetches everything up front
(see docs/state-resolution.md, "What callers must prefetch") and hands it over
as an ``EventSource``; a plain ``dict`` of event id -> ``Pdu`` also works.
A missing event raises ``MissingEventError`` naming it, so a caller can fetch
it and retry rather than get a wrong answer.
"""

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from homeserver.core.events import CREATE, Pdu

StateKey = tuple[str, str]
StateMap = Mapping[StateKey, str]  # (type, state_key) -> event id


class MissingEventError(KeyError):
    """State resolution needed an event the caller did not provide."""

    def __init__(self, event_id: str) -> None:
        super().__init__(event_id)
        self.event_id = event_id


@runtime_checkable
class EventSource(Protocol):
    def get_event(self, event_id: str) -> Pdu:
        """The event, or raise ``MissingEventError`` (or KeyError)."""
        ...

    def is_rejected(self, event_id: str) -> bool:
        """Whether the event was rejected when it was received."""
        ...


class DictEventSource:
    """An ``EventSource`` over prefetched events and a set of rejected ids."""

    __slots__ = ("_events", "_rejected")

    def __init__(self, events: Mapping[str, Pdu], rejected: Iterable[str] = ()) -> None:
        self._events = events
        self._rejected = frozenset(rejected)

    def get_event(self, event_id: str) -> Pdu:
        try:
            return self._events[event_id]
        except KeyError:
            raise MissingEventError(event_id) from None

    def is_rejected(self, event_id: str) -> bool:
        return event_id in self._rejected


def as_event_source(events: "EventSource | Mapping[str, Pdu]") -> EventSource:
    if isinstance(events, Mapping):
        return DictEventSource(events)
    return events


def implied_create_event_id(event: Pdu) -> str | None:
    """Room 12 events never cite the create event; their room id names it."""
    if event.room_version.create_event_in_auth_events or event.type == CREATE:
        return None
    room_id = event.room_id
    return "$" + room_id[1:] if isinstance(room_id, str) and room_id else None


def effective_auth_event_ids(event: Pdu) -> tuple[str, ...]:
    """The event's auth events, plus the create event room 12 leaves implied.

    Used both for the auth-chain index and the iterative auth checks, so the
    create event is part of every auth chain in every room version.
    """
    ids = event.auth_event_ids
    create_id = implied_create_event_id(event)
    if create_id is not None and create_id not in ids:
        return (*ids, create_id)
    return ids
