"""History visibility (spec "History visibility"): which events a user may see.

Decided from the state after each event (its state group): the room's
m.room.history_visibility and the user's membership at that point. A user
always sees their own membership events.
"""

from typing import Any

from homeserver.core.events import HISTORY_VISIBILITY, MEMBER, Pdu


def _visible(
    pdu: Pdu, state: dict[tuple[str, str], str], events: dict[str, Pdu], user_id: str,
    currently_joined: bool,
) -> bool:
    if pdu.type == MEMBER and pdu.state_key == user_id:
        return True
    hv_id = state.get((HISTORY_VISIBILITY, ""))
    hv_event = events.get(hv_id) if hv_id else None
    visibility = hv_event.content.get("history_visibility", "shared") if hv_event else "shared"
    if visibility == "world_readable":
        return True
    member_id = state.get((MEMBER, user_id))
    member = events.get(member_id) if member_id else None
    membership = member.content.get("membership") if member else None
    if membership == "join":
        return True
    if visibility == "shared":
        return currently_joined
    if visibility == "invited":
        return membership == "invite"
    return False


async def filter_visible(
    hs: Any, user_id: str, room_id: str, events: list[tuple[Pdu, int]]
) -> list[Pdu]:
    """The events (with their state groups) that ``user_id`` may see, in order."""
    if not events:
        return []
    room = await hs.room_states.get(room_id)
    currently_joined = room is not None and room.membership(user_id) == "join"
    states: dict[int, dict[tuple[str, str], str]] = {}
    needed: set[str] = set()
    for _, group in events:
        if group not in states:
            state = await hs.state_groups.get(group)
            states[group] = state
            for key in ((HISTORY_VISIBILITY, ""), (MEMBER, user_id)):
                if key in state:
                    needed.add(state[key])
    state_events = await hs.events.get_events(needed)
    return [
        pdu for pdu, group in events
        if _visible(pdu, states[group], state_events, user_id, currently_joined)
    ]


async def is_event_visible(hs: Any, user_id: str, pdu: Pdu, state_group: int) -> bool:
    return bool(await filter_visible(hs, user_id, pdu.room_id, [(pdu, state_group)]))
