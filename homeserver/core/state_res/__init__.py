"""State resolution: the state of a room where its DAG forks and rejoins.

Pure and synchronous. The caller passes the state sets to resolve, the
events they involve (an ``EventSource`` or a dict, prefetched: see
docs/state-resolution.md) and the room's ``ChainIndex`` over its auth DAG.
"""

from collections.abc import Mapping, Sequence

from homeserver.core.events import Pdu
from homeserver.core.room_versions import RoomVersion, StateResAlgorithm
from homeserver.core.state_res.chain_index import (
    ChainEntry,
    ChainIndex,
    ChainLink,
    UnindexedEventError,
)
from homeserver.core.state_res.source import (
    DictEventSource,
    EventSource,
    MissingEventError,
    StateKey,
    StateMap,
    effective_auth_event_ids,
)
from homeserver.core.state_res.v1 import resolve_state_v1
from homeserver.core.state_res.v2 import full_conflicted_set, resolve_state_v2, resolve_state_v2_1

__all__ = [
    "ChainEntry",
    "ChainIndex",
    "ChainLink",
    "DictEventSource",
    "EventSource",
    "MissingEventError",
    "StateKey",
    "StateMap",
    "UnindexedEventError",
    "effective_auth_event_ids",
    "full_conflicted_set",
    "index_event",
    "resolve_state",
    "resolve_state_v1",
    "resolve_state_v2",
    "resolve_state_v2_1",
]

_RESOLVERS = {
    StateResAlgorithm.V1: resolve_state_v1,
    StateResAlgorithm.V2: resolve_state_v2,
    StateResAlgorithm.V2_1: resolve_state_v2_1,
}


def resolve_state(
    room_version: RoomVersion,
    state_sets: Sequence[StateMap],
    events: EventSource | Mapping[str, Pdu],
    auth_index: ChainIndex | None,
) -> dict[StateKey, str]:
    """Resolve ``state_sets`` ((type, state_key) -> event id maps) into one.

    ``auth_index`` must hold every event of every state set (and so their
    auth chains); room 1 does not use it and accepts None.
    """
    resolver = _RESOLVERS[room_version.state_res]
    if auth_index is None and resolver is not resolve_state_v1:
        raise ValueError(f"room version {room_version.identifier} needs an auth chain index")
    return resolver(room_version, state_sets, events, auth_index)  # type: ignore[arg-type]


def index_event(auth_index: ChainIndex, event: Pdu) -> ChainEntry:
    """Add a state event to the index, room 12's implied create event included."""
    return auth_index.add_event(event.event_id, event.state_tuple, effective_auth_event_ids(event))
