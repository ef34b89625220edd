"""State resolution for room version 1 (spec: rooms/v1.md "State resolution").

The prose leaves two things open, settled here the way Synapse (the
reference implementation of rooms 1) settles them, since room-1 rooms only
converge if servers agree:

* "Repeat the above process for conflicts between m.room.member events" is
  done per (type, state_key), each against the state resolved by the earlier
  passes (power levels, then join rules), not against other members' results.
* When no conflicting event of an "other" key passes the auth rules, the last
  one in the order (lowest depth, highest sha1) is kept.
"""

import hashlib
from collections.abc import Mapping, Sequence

from homeserver.core.auth import AuthError, check_auth_rules
from homeserver.core.auth_events import auth_state_keys_for_pdu
from homeserver.core.events import JOIN_RULES, MEMBER, Pdu
from homeserver.core.room_versions import RoomVersion
from homeserver.core.state_res.chain_index import ChainIndex
from homeserver.core.state_res.common import CREATE_KEY, POWER_LEVELS_KEY
from homeserver.core.state_res.source import EventSource, StateKey, StateMap, as_event_source


def _separate(state_sets: Sequence[StateMap]) -> tuple[dict[StateKey, str], dict[StateKey, set]]:
    """Room 1: a conflict is two states holding different events for a key; a
    state that lacks the key does not conflict."""
    values: dict[StateKey, set[str]] = {}
    for state in state_sets:
        for key, event_id in state.items():
            values.setdefault(key, set()).add(event_id)
    unconflicted = {k: next(iter(v)) for k, v in values.items() if len(v) == 1}
    conflicted = {k: v for k, v in values.items() if len(v) > 1}
    return unconflicted, conflicted


def _newest_first(events: list[Pdu]) -> list[Pdu]:
    """Descending depth, then ascending sha1(event_id)."""
    return sorted(events, key=lambda e: (-e.depth, hashlib.sha1(e.event_id.encode()).digest()))


def _allowed(event: Pdu, state: Mapping[StateKey, Pdu]) -> bool:
    try:
        check_auth_rules(event, state)
    except AuthError:
        return False
    return True


def _resolve_auth_key(events: list[Pdu], state: dict[StateKey, Pdu]) -> Pdu:
    """Oldest first: take the first, then each next one while it is allowed."""
    ordered = list(reversed(_newest_first(events)))
    state = dict(state)
    accepted = ordered[0]
    for event in ordered[1:]:
        state[accepted.state_tuple] = accepted
        if not _allowed(event, state):
            break
        accepted = event
    return accepted


def resolve_state_v1(
    room_version: RoomVersion,
    state_sets: Sequence[StateMap],
    events: EventSource | Mapping[str, Pdu],
    auth_index: ChainIndex | None = None,
) -> dict[StateKey, str]:
    """State resolution for room 1; ``auth_index`` is not used."""
    if not state_sets:
        return {}
    if len(state_sets) == 1:
        return dict(state_sets[0])
    unconflicted, conflicted_ids = _separate(state_sets)
    if not conflicted_ids:
        return unconflicted
    source = as_event_source(events)
    conflicted = {
        key: [source.get_event(e) for e in ids] for key, ids in sorted(conflicted_ids.items())
    }
    # R: the unconflicted state, as far as the auth rules will look at it.
    needed = {CREATE_KEY}
    for pdus in conflicted.values():
        for pdu in pdus:
            needed.update(auth_state_keys_for_pdu(pdu))
    state = {k: source.get_event(unconflicted[k]) for k in needed if k in unconflicted}

    resolved: dict[StateKey, Pdu] = {}
    passes = (
        lambda key: key == POWER_LEVELS_KEY,
        lambda key: key[0] == JOIN_RULES,
        lambda key: key[0] == MEMBER,
    )
    for in_pass in passes:
        for key, pdus in conflicted.items():
            if in_pass(key) and key not in resolved:
                resolved[key] = _resolve_auth_key(pdus, state)
        state.update(resolved)
    for key, pdus in conflicted.items():
        if key not in resolved:
            ordered = _newest_first(pdus)
            resolved[key] = next((e for e in ordered if _allowed(e, state)), ordered[-1])

    result = dict(unconflicted)
    result.update((key, pdu.event_id) for key, pdu in resolved.items())
    return result
