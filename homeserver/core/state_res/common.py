"""Building blocks of state resolution v2 (rooms 2-11) and v2.1 (room 12).

Names follow the spec's "Definitions" in rooms/fragments/v2-state-res.md.
"""

import heapq
from collections.abc import Collection, Iterable, Sequence

from homeserver.core.auth import AuthError, check_auth_rules
from homeserver.core.auth_events import auth_state_keys_for_pdu
from homeserver.core.events import CREATE, JOIN_RULES, MEMBER, POWER_LEVELS, Pdu
from homeserver.core.power_levels import PowerLevels
from homeserver.core.state_res.chain_index import ChainIndex
from homeserver.core.state_res.source import (
    EventSource,
    StateKey,
    StateMap,
    effective_auth_event_ids,
)

CREATE_KEY: StateKey = (CREATE, "")
POWER_LEVELS_KEY: StateKey = (POWER_LEVELS, "")
JOIN_RULES_KEY: StateKey = (JOIN_RULES, "")


def separate(
    state_sets: Sequence[StateMap],
) -> tuple[dict[StateKey, str], dict[StateKey, set[str]]]:
    """The unconflicted state map and the conflicted state, by key.

    A key is unconflicted only if every state set has it, with the same event.
    """
    first, rest = state_sets[0], state_sets[1:]
    unconflicted: dict[StateKey, str] = {}
    conflicted: dict[StateKey, set[str]] = {}
    for key, event_id in first.items():
        for other in rest:
            if other.get(key) != event_id:
                conflicted[key] = {event_id}
                break
        else:
            unconflicted[key] = event_id
    for other in rest:
        for key in other.keys() - unconflicted.keys():
            conflicted.setdefault(key, set()).add(other[key])
    return unconflicted, conflicted


def is_power_event(event: Pdu) -> bool:
    """Power levels, join rules, or a kick/ban (leave/ban of someone else)."""
    if not event.is_state:
        return False
    if event.state_tuple in (POWER_LEVELS_KEY, JOIN_RULES_KEY):
        return True
    return (
        event.type == MEMBER
        and event.membership in ("leave", "ban")
        and event.sender != event.state_key
    )


class Resolver:
    """One resolution's view of its events, with per-resolution caches."""

    def __init__(self, source: EventSource, auth_index: ChainIndex | None) -> None:
        self.source = source
        self.auth_index = auth_index
        self._pdus: dict[str, Pdu] = {}
        self._auth_ids: dict[str, tuple[str, ...]] = {}

    def event(self, event_id: str) -> Pdu:
        pdu = self._pdus.get(event_id)
        if pdu is None:
            pdu = self._pdus[event_id] = self.source.get_event(event_id)
        return pdu

    def auth_event_ids(self, event: Pdu) -> tuple[str, ...]:
        """``effective_auth_event_ids``, parsed once per event."""
        ids = self._auth_ids.get(event.event_id)
        if ids is None:
            ids = self._auth_ids[event.event_id] = effective_auth_event_ids(event)
        return ids

    def state_key_of(self, event_id: str) -> StateKey | None:
        """Read from the index when possible, so auth events we only need to
        classify (is it the power levels?) need not be fetched."""
        index = self.auth_index
        if index is not None and event_id in index:
            return index.state_key_of(event_id)
        pdu = self.event(event_id)
        return pdu.state_tuple if pdu.is_state else None

    def auth_event_with_key(self, event: Pdu, key: StateKey) -> str | None:
        for auth_id in self.auth_event_ids(event):
            if self.state_key_of(auth_id) == key:
                return auth_id
        return None

    # --- reverse topological power ordering ----------------------------------------
    def sender_power_level(self, event: Pdu) -> int:
        """The sender's power level according to the event's own auth events."""
        create_id = self.auth_event_with_key(event, CREATE_KEY)
        if create_id is None:
            return 0  # only the create event itself has no create event
        power_id = self.auth_event_with_key(event, POWER_LEVELS_KEY)
        power = self.event(power_id) if power_id is not None else None
        return PowerLevels(power, self.event(create_id)).user_level(event.sender)

    def reverse_topological_power_order(self, event_ids: Collection[str]) -> list[str]:
        """Kahn's algorithm over the DAG the events' ``auth_events`` form among
        themselves, taking the smallest ready event by (higher sender power,
        origin_server_ts, event id)."""
        selected = set(event_ids)
        children: dict[str, list[str]] = {e: [] for e in selected}
        waiting = {}
        for event_id in selected:
            parents = set(self.auth_event_ids(self.event(event_id))) & selected
            waiting[event_id] = len(parents)
            for parent in parents:
                children[parent].append(event_id)

        def sort_key(event_id: str) -> tuple[int, int, str]:
            event = self.event(event_id)
            return (-self.sender_power_level(event), event.origin_server_ts, event_id)

        ready = [(sort_key(e), e) for e, n in waiting.items() if n == 0]
        heapq.heapify(ready)
        ordered = []
        while ready:
            _, event_id = heapq.heappop(ready)
            ordered.append(event_id)
            for child in children[event_id]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    heapq.heappush(ready, (sort_key(child), child))
        return ordered

    # --- mainline ordering -----------------------------------------------------------------
    def _power_levels_parent(self, event_id: str) -> str | None:
        return self.auth_event_with_key(self.event(event_id), POWER_LEVELS_KEY)

    def mainline_order(self, event_ids: Iterable[str], power_levels_id: str | None) -> list[str]:
        """Sort by mainline position (earlier mainline first), then ts, then id."""
        position: dict[str, float] = {}
        index = 0
        current = power_levels_id
        while current is not None:
            position[current] = index
            index += 1
            current = self._power_levels_parent(current)
        unknown: dict[str, float] = {}  # power levels events off the mainline

        def mainline_position(event_id: str) -> float:
            walked = []
            current = self._power_levels_parent(event_id)
            while current is not None and current not in position and current not in unknown:
                walked.append(current)
                current = self._power_levels_parent(current)
            if current is None:
                found = float("inf")
            else:
                found = position[current] if current in position else unknown[current]
            for power_id in walked:
                unknown[power_id] = found
            return found

        def sort_key(event_id: str) -> tuple[float, int, str]:
            return (-mainline_position(event_id), self.event(event_id).origin_server_ts, event_id)

        return sorted(event_ids, key=sort_key)

    # --- iterative auth checks -------------------------------------------------------------
    def iterative_auth_checks(
        self, event_ids: Iterable[str], state: dict[StateKey, str]
    ) -> dict[StateKey, str]:
        """Apply each event to ``state`` (in place) if it passes the auth rules.

        Keys the rules need come from the partial state; a key missing there
        comes from the event's own auth events, unless that auth event was
        rejected. Room 12's create event is always among its auth events.
        """
        is_rejected, get_event = self.source.is_rejected, self.event
        for event_id in event_ids:
            event = get_event(event_id)
            auth_events: dict[StateKey, Pdu] = {}
            for auth_id in self.auth_event_ids(event):
                if not is_rejected(auth_id):
                    auth_event = get_event(auth_id)
                    auth_events[auth_event.state_tuple] = auth_event
            for key in (CREATE_KEY, *auth_state_keys_for_pdu(event)):
                state_id = state.get(key)
                if state_id is not None:
                    auth_events[key] = get_event(state_id)
            try:
                check_auth_rules(event, auth_events)
            except AuthError:
                continue
            state[event.state_tuple] = event_id
        return state
