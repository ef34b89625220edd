"""The hot state of each room, kept in memory.

A room's current state (the events themselves), forward extremities, depth
and state group are loaded once from the database and then updated as events
are built, so sending an event needs no database read.
"""

from collections.abc import Iterator
from typing import Any

from twisted.internet import defer

from homeserver.core.events import CREATE, JOIN_RULES, MEMBER, POWER_LEVELS, Pdu, StateKey
from homeserver.core.power_levels import PowerLevels
from homeserver.core.room_versions import RoomVersion, get_room_version
from storage.events import RECENT_EVENTS, EventsStore

# State that invitees and knockers see (spec "Stripped state").
STRIPPED_STATE_TYPES = (
    "m.room.create", "m.room.join_rules", "m.room.name", "m.room.avatar", "m.room.topic",
    "m.room.canonical_alias", "m.room.encryption",
)


def stripped(event: dict[str, Any]) -> dict[str, Any]:
    """An event as stripped state: type, state_key, content and sender only."""
    return {k: event[k] for k in ("type", "state_key", "content", "sender") if k in event}


class RoomState:
    """One room's current state and tip, as this server sees it now."""

    __slots__ = (
        "room_id", "room_version", "state", "members", "extremities", "depth",
        "state_group", "chain_length", "_power_levels", "kind", "recent", "last_stream",
        "_joined_servers",
    )

    def __init__(self, room_id: str, room_version: RoomVersion) -> None:
        self.room_id = room_id
        self.room_version = room_version
        self.state: dict[StateKey, Pdu] = {}
        self.members: dict[str, str] = {}  # user id -> membership
        self.extremities: list[str] = []
        self.depth = 0
        self.state_group: int | None = None
        self.chain_length = 0
        self._power_levels: PowerLevels | None = None
        self._joined_servers: frozenset[str] | None = None
        self.kind: str | None = None  # "dm" for direct messages (docs/rooms.md)
        # The latest persisted events, oldest first: (stream, event_id, state_group).
        self.recent: list[tuple[int, str, int]] = []
        self.last_stream = 0  # stream ordering of the latest persisted event

    def add_persisted(self, stream: int, event_id: str, state_group: int) -> None:
        self.recent.append((stream, event_id, state_group))
        if len(self.recent) > 2 * RECENT_EVENTS:
            del self.recent[:-RECENT_EVENTS]
        self.last_stream = stream

    def apply_state(self, pdu: Pdu) -> None:
        """Make a state event part of the current state."""
        self.state[(pdu.type, pdu.state_key)] = pdu
        if pdu.type == MEMBER:
            self.members[pdu.state_key] = pdu.content.get("membership", "leave")
            self._joined_servers = None
        elif pdu.type == POWER_LEVELS or pdu.type == CREATE:
            self._power_levels = None

    # --- reading ---------------------------------------------------------------
    @property
    def create_event(self) -> Pdu:
        return self.state[(CREATE, "")]

    def get(self, event_type: str, state_key: str = "") -> Pdu | None:
        return self.state.get((event_type, state_key))

    def state_ids(self) -> dict[StateKey, str]:
        return {key: pdu.event_id for key, pdu in self.state.items()}

    def membership(self, user_id: str) -> str | None:
        return self.members.get(user_id)

    def users_with_membership(self, membership: str) -> Iterator[str]:
        return (u for u, m in self.members.items() if m == membership)

    @property
    def joined_servers(self) -> frozenset[str]:
        """The server names of the joined members (kept until a membership changes)."""
        if self._joined_servers is None:
            self._joined_servers = frozenset(
                u.partition(":")[2] for u, m in self.members.items() if m == "join"
            )
        return self._joined_servers

    @property
    def power_levels(self) -> PowerLevels:
        if self._power_levels is None:
            self._power_levels = PowerLevels(self.get(POWER_LEVELS), self.create_event)
        return self._power_levels

    @property
    def join_rule(self) -> str:
        event = self.get(JOIN_RULES)
        rule = event.content.get("join_rule") if event else None
        return rule if isinstance(rule, str) else "invite"

    def stripped_state(self) -> list[dict[str, Any]]:
        """The stripped state events an invitee or knocker is shown."""
        events = (self.get(event_type) for event_type in STRIPPED_STATE_TYPES)
        return [stripped(event.data) for event in events if event is not None]

    def content_of(self, event_type: str, key: str, default: Any = None) -> Any:
        event = self.get(event_type)
        return event.content.get(key, default) if event else default


class RoomStates:
    """Every room's RoomState, loaded on first use (one load per room at a time)."""

    def __init__(self, store: EventsStore) -> None:
        self._store = store
        self._rooms: dict[str, RoomState] = {}
        self._loading: dict[str, list[defer.Deferred[RoomState | None]]] = {}

    def add(self, room: RoomState) -> None:
        self._rooms[room.room_id] = room

    def invalidate(self, room_id: str) -> None:
        self._rooms.pop(room_id, None)

    def get_cached(self, room_id: str) -> RoomState | None:
        return self._rooms.get(room_id)

    async def get(self, room_id: str) -> RoomState | None:
        room = self._rooms.get(room_id)
        if room is not None:
            return room
        waiters = self._loading.get(room_id)
        if waiters is not None:  # someone is loading it already: wait for them
            d: defer.Deferred[RoomState | None] = defer.Deferred()
            waiters.append(d)
            return await d
        self._loading[room_id] = waiters = []
        try:
            room = await self._load(room_id)
        except BaseException as e:
            for d in self._loading.pop(room_id):
                d.errback(e)
            raise
        for d in self._loading.pop(room_id):
            d.callback(room)
        return room

    async def _load(self, room_id: str) -> RoomState | None:
        record = await self._store.load_room(room_id)
        if record is None:
            return None
        events = await self._store.get_events(record.current_state.values())
        room = RoomState(room_id, get_room_version(record.room_version))
        for key in record.current_state:
            room.apply_state(events[record.current_state[key]])
        room.extremities = list(record.forward_extremities)
        room.depth = record.max_depth
        room.state_group = record.state_group
        room.chain_length = record.state_group_chain_length
        if await self._store.get_state_group(record.state_group) != record.current_state:
            # State resolution made the current state, which has no group yet:
            # the next event writes one.
            room.state_group = None
        room.kind = record.kind
        room.recent = list(record.recent)
        room.last_stream = record.recent[-1][0] if record.recent else 0
        return self._rooms.setdefault(room_id, room)
