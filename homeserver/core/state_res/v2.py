"""State resolution v2 (rooms 2-11) and v2.1 (room 12).

Spec: rooms/fragments/v2-state-res.md "Algorithm"; rooms/v12.md "State
resolution" for v2.1, which adds the conflicted state subgraph to the full
conflicted set and starts the first iterative auth checks from an empty map.
"""

from collections.abc import Mapping, Sequence

from homeserver.core.events import Pdu
from homeserver.core.room_versions import RoomVersion
from homeserver.core.state_res.chain_index import ChainIndex
from homeserver.core.state_res.common import POWER_LEVELS_KEY, Resolver, is_power_event, separate
from homeserver.core.state_res.source import (
    EventSource,
    StateKey,
    StateMap,
    as_event_source,
)


def full_conflicted_set(
    state_sets: Sequence[StateMap],
    auth_index: ChainIndex,
    *,
    with_conflicted_subgraph: bool,
) -> tuple[dict[StateKey, str], set[str]]:
    """The unconflicted state map and the full conflicted set: the conflicted
    events, the auth difference and (v2.1) the conflicted state subgraph.

    Needs only the index, so callers can use it to decide what to prefetch.
    """
    unconflicted, conflicted = separate(state_sets)
    if not conflicted:
        return unconflicted, set()
    conflicted_ids = set().union(*conflicted.values())
    own_conflicted = [{s[k] for k in conflicted if k in s} for s in state_sets]
    full = conflicted_ids | auth_index.auth_difference_of(unconflicted, own_conflicted)
    if with_conflicted_subgraph:
        full |= auth_index.conflicted_subgraph(conflicted_ids)
    return unconflicted, full


def _resolve(
    state_sets: Sequence[StateMap],
    events: EventSource | Mapping[str, Pdu],
    auth_index: ChainIndex,
    *,
    v2_1: bool,
) -> dict[StateKey, str]:
    if not state_sets:
        return {}
    unconflicted, full = full_conflicted_set(state_sets, auth_index, with_conflicted_subgraph=v2_1)
    if not full:
        return unconflicted
    resolver = Resolver(as_event_source(events), auth_index)
    # 1. Power events plus the events of their auth chains in the full conflicted set.
    power_events = [e for e in full if is_power_event(resolver.event(e))]
    selected = auth_index.reachable(power_events, full)
    ordered = resolver.reverse_topological_power_order(selected)
    # 2. Iterative auth checks from the unconflicted state map (v2.1: from nothing).
    state = resolver.iterative_auth_checks(ordered, {} if v2_1 else dict(unconflicted))
    # 3-4. The rest by mainline ordering on the resolved power levels, checked on top.
    rest = resolver.mainline_order(
        (e for e in full if e not in selected), state.get(POWER_LEVELS_KEY)
    )
    state = resolver.iterative_auth_checks(rest, state)
    # 5. The unconflicted state map wins.
    state.update(unconflicted)
    return state


def resolve_state_v2(
    room_version: RoomVersion,
    state_sets: Sequence[StateMap],
    events: EventSource | Mapping[str, Pdu],
    auth_index: ChainIndex,
) -> dict[StateKey, str]:
    """State resolution for rooms 2-11."""
    return _resolve(state_sets, events, auth_index, v2_1=False)


def resolve_state_v2_1(
    room_version: RoomVersion,
    state_sets: Sequence[StateMap],
    events: EventSource | Mapping[str, Pdu],
    auth_index: ChainIndex,
) -> dict[StateKey, str]:
    """State resolution for room 12."""
    return _resolve(state_sets, events, auth_index, v2_1=True)
